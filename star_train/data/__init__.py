"""The data layer: STAR records (``records``), tool specs (``tools``), tokenized training
examples (``examples``) and RL prompts (``prompts``). Imports only ``chat``."""
