"""Models on the training side: loading (never from a hub), precision, the next-token rows.

``load_model`` takes a local Hugging Face folder, a ``.gguf`` file (any architecture
transformers reads from GGUF, dequantized to fp32) or builds a random Qwen3 from a config;
``load_tokenizer`` gives the tokenizer that goes with it (the model's own, or the offline
Qwen3 one for a config-built Qwen3) and ``model_renderer`` the chat format its config
keys choose. ``check_shared_vocabulary`` refuses a teacher and a
student whose token ids do not mean the same thing (CKD compares them id by id).
``predicting_rows`` runs a model's trunk only and returns the hidden states that predict
the marked tokens, with the lm_head weight: the input of every fused ``star_kernels`` op,
so no stage ever computes ``[tokens x vocab]`` logits. The next-token shift (hidden state
``t - 1`` predicts token ``t``) is written here once.
"""

from __future__ import annotations

import copy
import functools
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


def local_source(path: str, what: str = "model path") -> tuple[str, dict]:
    """``(folder, from_pretrained keywords)`` for a local HF folder or a ``.gguf`` file;
    FileNotFoundError naming ``what`` for anything else (nothing is fetched from a hub)."""
    location = Path(path)
    if location.is_dir():
        return str(location), {"local_files_only": True}
    if location.is_file() and location.suffix == ".gguf":
        return str(location.parent), {"gguf_file": location.name, "local_files_only": True}
    raise FileNotFoundError(f"{what} {path!r} is neither a local directory nor a .gguf file "
                            "(models are never fetched from a hub here)")


def load_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    """A causal LM from a local Hugging Face directory or ``.gguf`` file, or a random Qwen3
    from ``spec.config``."""
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if spec.path:
        folder, kwargs = local_source(spec.path)
        # No dtype argument: its name changed across transformers versions (torch_dtype/dtype).
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        if "gguf_file" in kwargs:
            model = _plain_model(model)
        model = model.to(dtype)
    else:
        # Seeded on its own generator state so the same spec always gives the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = Qwen3ForCausalLM(Qwen3Config(**spec.config)).to(dtype)
    return model.to(device)


def _plain_model(model):
    """A GGUF-loaded model as an ordinary one: transformers marks it quantized (its weights
    were dequantized on load) and then refuses ``save_pretrained``; the same weights in a
    model built from the config without that mark save like any other."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    return plain.eval()


def model_name(spec: ModelSpec) -> str:
    """What identifies a model in settings pins: its folder, or its config and seed."""
    return spec.path or json.dumps({"config": spec.config, "seed": spec.seed}, sort_keys=True)


# Files a Hugging Face folder's own tokenizer is read from (any one of them will do).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_own_tokenizer(path: str) -> bool:
    """Whether a model folder or file carries a tokenizer (a .gguf file always does)."""
    location = Path(path)
    return location.suffix == ".gguf" or any((location / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(spec: ModelSpec | str | None = None):
    """The tokenizer of a model: its folder's or ``.gguf`` file's own, or the offline Qwen3
    tokenizer for a config-built Qwen3 (``spec`` without a path, or None) and for a folder
    without tokenizer files (a Qwen3 saved with ``save_pretrained`` alone; any other model
    is then refused by ``check_vocab``, its vocabulary being smaller than Qwen3's)."""
    path = spec.path if isinstance(spec, ModelSpec) else spec
    folder, kwargs = local_source(path, "tokenizer path") if path else (None, {})
    if not path or not has_own_tokenizer(path):
        from ..chat.tokenizer import qwen3_tokenizer

        return qwen3_tokenizer()
    from transformers import AutoTokenizer

    if "gguf_file" in kwargs:
        # Building a tokenizer from a GGUF vocabulary is slow (about 15 s for SmolLM2's
        # 49,152 tokens on a loaded CPU) and a run asks for it several times (stages, eval,
        # the vocabulary check): build it once per file version and hand out copies, which
        # callers may change (padding side, added tokens) without touching the others'.
        location = Path(path).resolve()
        return copy.deepcopy(_gguf_tokenizer(str(location), location.stat().st_mtime_ns))
    return AutoTokenizer.from_pretrained(folder, **kwargs)


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: str, mtime_ns: int):
    from transformers import AutoTokenizer

    location = Path(path)
    return AutoTokenizer.from_pretrained(str(location.parent), gguf_file=location.name,
                                         local_files_only=True)


def model_renderer(spec: ModelSpec, tokenizer, key: str = "model"):
    """The chat format of the model ``spec`` names, with its ``tokenizer``: its
    ``chat_template`` and ``tool_format`` keys resolved (``chat.templates.chat_renderer``).
    ``key``: where the spec sits in the config (``"policy.model"``), named by a ConfigError
    when the keys do not fit this model. With the defaults a Qwen3 (offline tokenizer, or
    a Qwen3 folder's own) gets exactly the Qwen3 format STAR trains on."""
    from ..chat.templates import chat_renderer
    from .config import ConfigError

    try:
        return chat_renderer(tokenizer, spec.tool_format, template=spec.chat_template)
    except ValueError as error:
        raise ConfigError(f"{key}.{error}") from None


def check_shared_vocabulary(teacher, student, teacher_tokenizer=None, student_tokenizer=None) -> None:
    """Refuse a teacher/student pair whose token ids differ in meaning: distillation compares
    the two distributions id by id. Models: the same ``vocab_size`` (lm_head rows).
    Tokenizers (when given): the same token -> id table. ValueError names what differs."""
    t_rows, s_rows = teacher.config.vocab_size, student.config.vocab_size
    if t_rows != s_rows:
        raise ValueError(f"teacher and student do not share a vocabulary: teacher vocab_size "
                         f"{t_rows}, student vocab_size {s_rows} (CKD needs the same token ids)")
    if teacher_tokenizer is None or student_tokenizer is None:
        return
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab == s_vocab:
        return
    only_t = sorted(set(t_vocab) - set(s_vocab))[:3]
    only_s = sorted(set(s_vocab) - set(t_vocab))[:3]
    moved = sorted(token for token in set(t_vocab) & set(s_vocab) if t_vocab[token] != s_vocab[token])[:3]
    raise ValueError(
        f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens; "
        f"only the teacher's: {only_t}, only the student's: {only_s}, other ids: "
        f"{[(tok, t_vocab[tok], s_vocab[tok]) for tok in moved]}): CKD needs the same token ids")


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
    and the lm_head. ``batch`` is right-padded (``data.examples.pad_batch``) or packed with
    restarting ``position_ids`` and no attention mask (``data.examples.pack_batch``)."""
    input_ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"]
    extra = {"position_ids": batch["position_ids"].to(device)} if "position_ids" in batch else {}
    hidden, weight, bias = hidden_states(model, input_ids,
                                         None if mask is None else mask.to(device), **extra)
    predicts = batch["target_mask"][:, 1:].to(device)  # hidden at t - 1 predicts token t
    return hidden[:, :-1][predicts], input_ids[:, 1:][predicts], weight, bias
