"""The chat layer: the Qwen3 chat format (``qwen3``) and the offline Qwen3 tokenizer
(``tokenizer``). Imports nothing else from star_train."""
