"""Build or load the teacher and student causal LMs (never from a hub: local files or a config)."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelSpec

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    """A causal LM from a local Hugging Face directory, or a random Qwen3 from ``spec.config``."""
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if spec.path:
        if not Path(spec.path).is_dir():
            raise FileNotFoundError(f"model path {spec.path!r} is not a local directory "
                                    "(models are never fetched from a hub here)")
        # No dtype argument: its name changed across transformers versions (torch_dtype/dtype).
        model = AutoModelForCausalLM.from_pretrained(spec.path, local_files_only=True).to(dtype)
    else:
        # Seeded on its own generator state so the same spec always gives the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = Qwen3ForCausalLM(Qwen3Config(**spec.config)).to(dtype)
    return model.to(device)
