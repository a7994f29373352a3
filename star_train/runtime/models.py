"""Models on the training side: loading (never from a hub), precision, the next-token rows.

``load_model`` takes a local Hugging Face folder or builds a random Qwen3 from a config.
``predicting_rows`` runs a model's trunk only and returns the hidden states that predict
the marked tokens, with the lm_head weight: the input of every fused ``star_kernels`` op,
so no stage ever computes ``[tokens x vocab]`` logits. The next-token shift (hidden state
``t - 1`` predicts token ``t``) is written here once.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from star_kernels.hf import hidden_states

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


def model_name(spec: ModelSpec) -> str:
    """What identifies a model in settings pins: its folder, or its config and seed."""
    return spec.path or json.dumps({"config": spec.config, "seed": spec.seed}, sort_keys=True)


def check_vocab(model, tokenizer, role: str) -> None:
    """The model must have a row for every token id the tokenizer produces."""
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"{role} vocab_size {model.config.vocab_size} is smaller than the "
                         f"tokenizer's {len(tokenizer)} tokens")


def enable_gradient_checkpointing(model) -> None:
    # transformers 5 renamed the method; the old name still works there but warns.
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()


def autocast(device: torch.device, dtype: torch.dtype):
    """The mixed-precision context of a run: autocast to ``dtype``, none for float32."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def predicting_rows(model, batch: dict, device: torch.device) -> tuple:
    """``(rows [N, H], ids [N], weight, bias)``: the trunk's hidden states that predict the
    tokens marked by ``batch["target_mask"]`` (row-major over the batch), those tokens' ids
    and the lm_head. ``batch`` is right-padded (``data.examples.pad_batch``)."""
    input_ids = batch["input_ids"].to(device)
    hidden, weight, bias = hidden_states(model, input_ids, batch["attention_mask"].to(device))
    predicts = batch["target_mask"][:, 1:].to(device)  # hidden at t - 1 predicts token t
    return hidden[:, :-1][predicts], input_ids[:, 1:][predicts], weight, bias
