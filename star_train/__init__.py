"""star_train: the STAR curriculum on one device (teacher rollouts, CKD, Sim-RL, BFCL eval).

Layers; each imports only from the layers above it in this list:

``chat``      the Qwen3 chat format: rendering, markers, response parsing; the offline
              Qwen3 tokenizer.
``data``      STAR records, tool specs, tokenized training examples, RL prompts.
              A new data source (a converter to STAR records) goes here.
``reward``    STAR's similarity reward and GRPO group helpers (public:
              ``similarity_reward``, ``keep_group``, ``group_advantages``).
``runtime``   what every stage runs on: config loading, model loading, run folders and
              settings pins, checkpoints, schedules, seeded generation, and the one
              training skeleton (``runtime.trainer``).
``stages``    the curriculum's stages, each its config plus what is its own: ``rollouts``,
              ``ckd`` (with ``teacher_cache``), ``simrl``. A new stage goes here: a
              config dataclass, and for a training stage a ``Stage`` for the skeleton.
``eval``      BFCL v3 evaluation and the ``star-train eval`` command.
``cli``, ``demo``  the ``star-train`` entry points.
"""
