"""The optional GPU speed-ups (``runtime.speedups``) fall back cleanly on CPU and without
their packages, and an explicit request that cannot run names the key."""

import pytest
import torch

from star_train.runtime import speedups
from star_train.runtime.config import ModelSpec
from star_train.runtime.models import load_model
from train_fixtures import tiny_qwen3

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.fixture
def flash_attn_installed(monkeypatch):
    def set_installed(value: bool):
        real = speedups.installed
        monkeypatch.setattr(speedups, "installed",
                            lambda name: value if name in ("flash_attn", "liger_kernel") else real(name))
    return set_installed


def test_auto_attention_is_flash_attention_only_on_cuda_with_the_package(flash_attn_installed):
    flash_attn_installed(True)
    assert speedups.pick_attention("auto", CUDA) == "flash_attention_2"
    assert speedups.pick_attention("auto", CPU) == "sdpa"
    flash_attn_installed(False)
    assert speedups.pick_attention("auto", CUDA) == "sdpa"
    assert speedups.pick_attention("eager", CPU) == "eager"


@pytest.mark.parametrize("device, present", [(CPU, True), (CUDA, False)])
def test_explicit_flash_attention_where_it_cannot_run_names_the_key(device, present, flash_attn_installed):
    flash_attn_installed(present)
    with pytest.raises(ValueError, match="train.attn_implementation = 'flash_attention_2' needs"):
        speedups.pick_attention("flash_attention_2", device)


def test_liger_falls_back_with_one_line_saying_why(flash_attn_installed):
    model = load_model(ModelSpec(**tiny_qwen3(32, 1, 0)), torch.float32, CPU)
    modules_before = [type(m) for m in model.modules()]
    lines = []
    assert speedups.apply_liger_trunk(model, CPU, lines.append) is False
    flash_attn_installed(False)
    assert speedups.apply_liger_trunk(model, CUDA, lines.append) is False
    assert [type(m) for m in model.modules()] == modules_before
    assert "need CUDA" in lines[0] and "not installed" in lines[1]


def test_switching_attention_keeps_the_function():
    model = load_model(ModelSpec(**tiny_qwen3(32, 2, 0)), torch.float32, CPU).eval()
    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sdpa = model(ids).logits
        speedups.set_attention(model, "eager")
        eager = model(ids).logits
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
