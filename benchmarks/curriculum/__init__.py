"""The curriculum benchmark: STAR (SFT / CKD / CKD + Sim-RL) on real SmolLM2 weights.

``python -m benchmarks.curriculum --size cpu`` runs every step (resumable: a finished
step is skipped, an interrupted training stage resumes from its checkpoint) and writes
``benchmarks/results/curriculum-<size>.{json,md,png}``. See ``README.md`` here.
"""
