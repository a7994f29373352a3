"""Atomic training checkpoints: a run killed at any instant resumes from the last complete one.

A checkpoint is a folder ``step-000123`` holding the model (safetensors, tied weights
handled), the optimizer and scheduler states, the RNG states and ``state.json``. It is
written under a temporary name and renamed into place, so a folder with the final name
is always complete; leftovers of an interrupted write are removed on the next save.

The format is the same whatever the run's world size and ``train.data_parallel``: the full
(unsharded) model and optimizer state. An FSDP2-sharded run gathers them for rank 0 to
write (``distributed.full_model_state`` / ``full_optimizer_state``) and on resume every rank
reads the files and keeps its own shard, so a checkpoint resumes on any number of
processes, sharded or not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from . import distributed
from .run_folder import describe_changes

_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, state: dict,
                    keep: int = 2, *, model_state: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write a checkpoint of ``model`` and ``optimizer``, or of their gathered full states
    ``model_state`` / ``optimizer_state`` when given (an FSDP2-sharded run)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()
    # save_model stores tied tensors once (the others in its metadata): the same for a
    # gathered state dict, whose tied names share one tensor.
    save_model(model if model_state is None else _Tensors(model_state),
               str(tmp / "model.safetensors"))
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict()
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    for written in tmp.iterdir():  # on disk before the rename publishes them
        _fsync(written, os.O_RDONLY)
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (resumed run that crashed right after)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model, optimizer, scheduler, run: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler and RNG states in place; returns ``state.json``.

    ``run`` holds the settings that decide which data each step sees (data fingerprint,
    batch size, seed, ...); the checkpoint's own (saved under ``state["run"]``) must
    match, else resuming would silently skip or repeat data, so it raises first.
    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    changes = describe_changes(state.get("run", {}), run or {})
    if changes:
        raise ValueError(f"checkpoint {path} was written by a run with other data settings "
                         f"({changes}); resuming would skip or repeat data. Restore them or "
                         "use a new train.out_dir")
    sharded = distributed.is_sharded(model)
    if sharded:
        _load_sharded(path, model)
    else:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        untied_missing = [n for n in missing if not _tied_to_loaded(model, n, set(missing))]
        if unexpected or untied_missing:
            raise RuntimeError(f"checkpoint {path} does not match the model: missing "
                               f"{untied_missing}, unexpected {unexpected}")
    # weights_only: a checkpoint folder from elsewhere must not be able to run code here
    # (a full unpickle would); the trainer state is plain tensors, numbers and lists.
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    optimizer_state = trainer["optimizer"]
    if sharded:
        optimizer_state = distributed.shard_optimizer_state(optimizer, optimizer_state)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng_cpu"])
    if trainer["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng_cuda"])
    return state


class _Tensors:
    """A state dict in the shape ``safetensors.torch.save_model`` reads a model in."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def state_dict(self) -> dict:
        return dict(self.tensors)


def _load_sharded(path: Path, model) -> None:
    """The full weights into an FSDP2-sharded model: every rank reads the file one tensor
    at a time and keeps its own shard."""
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        unexpected = sorted(names - set(model.state_dict(keep_vars=True)))
        if unexpected:
            raise RuntimeError(f"checkpoint {path} does not match the model: "
                               f"unexpected {unexpected}")
        try:
            distributed.load_full_model_state(
                model, lambda name: f.get_tensor(name) if name in names else None)
        except RuntimeError as error:
            raise RuntimeError(f"checkpoint {path} does not match the model: {error}") from None


def append_log(path: Path, record: dict):
    """One JSON line per optimizer step in the run's ``train_log.jsonl``."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int):
    """Drop log lines of steps after ``step``: their updates died with the interrupted run."""
    if not path.exists():
        return
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # torn while being appended (killed, disk full): its step never saved
    kept = [line for line in lines if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _tied_to_loaded(model, name: str, missing: set) -> bool:
    """safetensors stores one copy of tied parameters, so the other name reports as
    missing: fine when it shares storage with a parameter that was loaded."""
    tensors = model.state_dict(keep_vars=True)
    ptr = tensors[name].data_ptr()
    return any(other not in missing and t.data_ptr() == ptr
               for other, t in tensors.items() if other != name)


def _fsync(path: Path, flags: int):
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path):
    _fsync(path, os.O_RDONLY)
