"""benchmarks.train_steps (run by gpu_check.sh at the Qwen3-0.6B shape) on CPU at its toy
shape: the Sim-RL update pass trains through the skeleton, the summary comes from the log,
and the arithmetic counts the model's real parameters."""

import json

import torch

from benchmarks import train_steps
from star_train.runtime.config import ModelSpec
from star_train.runtime.models import load_model


def test_simrl_loss_steps_record_throughput_and_the_arithmetic(tmp_path):
    assert train_steps.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                             "--completion-tokens", "16", "--parts", "simrl-loss", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train-steps-tiny.json").read_text())
    part = result["parts"]["simrl-loss"]
    records = part["records"]
    shape = train_steps.SHAPES["tiny"]
    assert [r["step"] for r in records] == list(range(1, shape["steps"] + 1))
    # batch_size sequences of 16 synthetic completion tokens, each one a target
    assert part["tokens_per_step"] == shape["batch_size"] * 16
    assert all(r["updated"] and r["world_size"] == 1 and r["tokens_per_s"] > 0 for r in records)
    assert part["peak_memory_gib_max"] is None  # CPU: no device counter, said so in the table
    model = load_model(ModelSpec(config=shape["config"]), torch.float32, torch.device("cpu"))
    count = sum(p.numel() for p in model.parameters())
    assert result["arithmetic"]["parameters"] == count
    assert result["arithmetic"]["weights_grads_adam_gib"] == round(16 * count / 2**30, 3)
    assert "| simrl-loss | 3 |" in (tmp_path / "train-steps-tiny.md").read_text()
