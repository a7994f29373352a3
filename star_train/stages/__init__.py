"""The stages of the STAR curriculum: ``rollouts`` (teacher answers -> CKD data), ``ckd``
(stage 1, with its ``teacher_cache``), ``simrl`` (stage 2); ``sampling`` is what rollouts
and Sim-RL share. Each module holds its config and only what is its own; the training
loop itself is ``runtime.trainer``."""
