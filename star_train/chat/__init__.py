"""The chat layer: the Qwen3 chat format (``qwen3``), tool-call formats (``formats``:
Hermes, Llama 3.1 JSON), a model's chat format as one component (``templates``:
``ChatRenderer``, what the stages, the reward and BFCL eval use) and the offline Qwen3
tokenizer (``tokenizer``). Imports nothing else from star_train."""
