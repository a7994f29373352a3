"""A run's folder: its recorded config, settings pins and atomic file writes.

A pin records the settings that output was made under (``meta.json`` of a teacher cache,
``run.json`` of rollouts) on first use and refuses other settings afterwards, so output
made under one set of settings is never mixed with or reused for another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import distributed
from .config import config_to_dict


def open_run(out_dir: str | Path, cfg) -> Path:
    """Create ``out_dir`` and record the run's full config in it (``config.json``; under
    torchrun rank 0 writes it, the others wait until it is there)."""
    out = Path(out_dir)
    world = distributed.current()
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.json", json.dumps(config_to_dict(cfg), indent=1))
    world.barrier()
    return out


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name and rename it into place: a reader (or a
    resumed run) sees the old file or the whole new one, never a torn one."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def describe_changes(saved: dict, current: dict) -> str:
    """``"key: old -> new, ..."`` for the keys of ``current`` whose saved value differs."""
    changed = sorted(k for k in current if saved.get(k) != current[k])
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)


def pin_settings(path: Path, settings: dict, owner: str, remedy: str) -> None:
    """Record ``settings`` at ``path`` on first use; afterwards refuse other ones. Under
    torchrun every rank checks and rank 0 alone writes (two writers would race)."""
    path = Path(path)
    if path.exists():
        changes = describe_changes(json.loads(path.read_text()), settings)
        if changes:
            raise ValueError(f"{owner} was made with other settings ({changes}); {remedy}")
        return
    if not distributed.current().is_main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(settings, indent=1))
