"""The experiment's sizes: every setting of a run, in one dict per size.

``smoke``: every step at a toy size (minutes on an idle CPU): checks the pipeline end to
end; its numbers say nothing about the methods. ``cpu``: about an hour on an idle 2-core CPU
machine (fp32); ``cpu-long`` the same with twice the student SFT and CKD steps. ``gpu``: the same steps at a
size worth a GPU (bf16 autocast; config only, not run here). Seeds: ``seed`` drives the
data order of every stage and the Sim-RL sampling; the data split is fixed by the data
file (``data/README.md``).
"""

from __future__ import annotations

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CPU = {
    "seed": 0,
    "device": "cpu",
    "dtype": "float32",                 # bf16 autocast is slower than fp32 on this CPU
    "train_rows": 96,                   # first rows of data/xlam_rows.jsonl
    "heldout_rows": 32,                 # last rows of the file (never trained on)
    "max_length": 768,
    "student_layers": [0, 1, 2, 3, 27, 28, 29],   # kept layers of SmolLM2's 30
    "teacher_sft": {"lr": 1e-4, "batch_size": 8, "epochs": 1},
    "student_sft": {"lr": 3e-4, "batch_size": 8, "epochs": 4},
    "ckd": {"lr": 3e-4, "batch_size": 8, "epochs": 4, "k": 100, "tail_coef": 10.0,
            "student_topm": 100},
    "simrl": {"lr": 2e-6, "steps": 6, "num_samples": 4, "prompts_per_step": 4,
              "max_sampling_rounds": 2, "max_new_tokens": 96, "temperature": 1.0},
    "eval": {"bfcl_limit": 10, "max_new_tokens": 128, "batch_size": 8},
}

SIZES = {
    "smoke": {
        **CPU,
        "train_rows": 32,
        "heldout_rows": 8,
        "student_sft": {**CPU["student_sft"], "epochs": 2},
        "ckd": {**CPU["ckd"], "epochs": 2},
        "simrl": {**CPU["simrl"], "steps": 2, "prompts_per_step": 2, "max_sampling_rounds": 1,
                  "max_new_tokens": 64},
        "eval": {**CPU["eval"], "bfcl_limit": 2, "max_new_tokens": 64},
    },
    "cpu": CPU,
    # The cpu size with twice the student training (96 SFT and 96 CKD steps): does the
    # gap between CKD and SFT hold, and does either start to get calls right?
    "cpu-long": {
        **CPU,
        "student_sft": {**CPU["student_sft"], "epochs": 8},
        "ckd": {**CPU["ckd"], "epochs": 8},
    },
    "gpu": {
        **CPU,
        "device": "cuda",
        "dtype": "bfloat16",
        "train_rows": 224,
        "max_length": 1024,
        "student_layers": [0, 1, 2, 3, 4, 5, 24, 25, 26, 27, 28, 29],
        "teacher_sft": {"lr": 5e-5, "batch_size": 16, "epochs": 3},
        "student_sft": {"lr": 2e-4, "batch_size": 16, "epochs": 8},
        "ckd": {**CPU["ckd"], "lr": 2e-4, "batch_size": 16, "epochs": 8},
        "simrl": {**CPU["simrl"], "lr": 1e-6, "steps": 40, "num_samples": 8,
                  "prompts_per_step": 16, "max_sampling_rounds": 4, "max_new_tokens": 256},
        "eval": {"bfcl_limit": 100, "max_new_tokens": 256, "batch_size": 32},
    },
}
