"""The teacher's top-k log-probs over every target token, computed once and stored on disk.

The CKD loss needs, per response token, the teacher's top-k ids and their log-probs
(normalised over the full vocabulary). The teacher runs its trunk only and
``star_kernels.fused_linear_topk_logprobs`` picks the top-k from hidden states, so no
``[tokens x vocab]`` teacher logits exist at any point.

Layout: ``meta.json`` (k, teacher, the examples' fingerprint, shard size) and
``shard-00000.safetensors`` ... with ``ids`` ``[rows, k]`` int32, ``logprobs`` ``[rows, k]``
float32 and ``offsets`` ``[examples + 1]`` int64 (the rows of example ``i`` of the shard are
``offsets[i]:offsets[i + 1]``). A shard is written under a temporary name and renamed,
so building resumes after an interruption by skipping the shards that exist. Under
torchrun each rank builds every ``world_size``-th shard and all wait for the whole cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import star_kernels as sk

from ..data.examples import Example, example_batch
from ..runtime import distributed
from ..runtime.models import predicting_rows
from ..runtime.run_folder import pin_settings


def _shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:05d}.safetensors"


def cache_settings(*, k: int, teacher_name: str, fingerprint: str, num_examples: int,
                   shard_size: int) -> dict:
    """What a cache is valid for (its ``meta.json``)."""
    return {"k": k, "teacher": teacher_name, "fingerprint": fingerprint,
            "num_examples": num_examples, "shard_size": shard_size}


def pin_cache_settings(directory: Path, settings: dict) -> None:
    pin_settings(Path(directory) / "meta.json", settings, f"teacher cache {directory}",
                 "use another cache folder or delete it")


@torch.no_grad()
def build_teacher_cache(teacher, examples: list[Example], directory: str | Path, *, k: int,
                        batch_size: int, shard_size: int, fingerprint: str, teacher_name: str,
                        pad_id: int) -> Path:
    """Fill ``directory`` with the teacher's top-k for every target token of ``examples``."""
    directory = Path(directory)
    pin_cache_settings(directory, cache_settings(
        k=k, teacher_name=teacher_name, fingerprint=fingerprint, num_examples=len(examples),
        shard_size=shard_size))
    device = next(teacher.parameters()).device
    teacher.eval()
    world = distributed.current()
    mine = world.share(list(enumerate(range(0, len(examples), shard_size))))
    done = sum(len(examples[start:start + shard_size]) for shard, start in mine
               if _shard_path(directory, shard).exists())
    bar = tqdm(total=sum(len(examples[start:start + shard_size]) for _, start in mine),
               initial=done, desc="teacher top-k cache", unit="example", mininterval=2,
               disable=not world.is_main)
    for shard, start in mine:
        path = _shard_path(directory, shard)
        if path.exists():
            continue
        members = examples[start:start + shard_size]
        ids, logprobs, counts = [], [], []
        for first in range(0, len(members), batch_size):
            group = members[first:first + batch_size]
            rows, _, weight, bias = predicting_rows(teacher, example_batch(group, pad_id), device)
            if rows.shape[0]:
                top_ids, top_logprobs = sk.fused_linear_topk_logprobs(rows, weight, k, bias=bias)
                ids.append(top_ids.to("cpu", torch.int32))
                logprobs.append(top_logprobs.to("cpu", torch.float32))
            counts.extend(ex.num_targets for ex in group)
            bar.update(len(group))
        offsets = torch.zeros(len(members) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
        tensors = {
            "ids": torch.cat(ids) if ids else torch.zeros((0, k), dtype=torch.int32),
            "logprobs": torch.cat(logprobs) if logprobs else torch.zeros((0, k)),
            "offsets": offsets,
        }
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    bar.close()
    world.barrier()  # every rank's shards are written before any rank reads the cache
    return directory


class TeacherCache:
    """Read access to a complete cache: ``cache[i]`` -> ``(ids [n_i, k] int64, logprobs [n_i, k])``."""

    def __init__(self, directory: str | Path, fingerprint: str | None = None):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no teacher cache in {self.directory} (meta.json missing)")
        self.meta = json.loads(meta_path.read_text())
        if fingerprint is not None and self.meta["fingerprint"] != fingerprint:
            raise ValueError(f"teacher cache {self.directory} was built for other examples")
        self.k = self.meta["k"]
        self.shard_size = self.meta["shard_size"]
        num_shards = -(-self.meta["num_examples"] // self.shard_size)
        missing = [s for s in range(num_shards) if not _shard_path(self.directory, s).exists()]
        if missing:
            raise FileNotFoundError(f"teacher cache {self.directory} is incomplete: shard(s) "
                                    f"{missing[:5]} missing; build it again to resume")
        self._files = [safe_open(str(_shard_path(self.directory, s)), framework="pt")
                       for s in range(num_shards)]
        self._offsets = [f.get_tensor("offsets") for f in self._files]

    def __len__(self) -> int:
        return self.meta["num_examples"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} is not in the cache ({len(self)} examples)")
        shard, row = divmod(index, self.shard_size)
        begin, end = self._offsets[shard][row].item(), self._offsets[shard][row + 1].item()
        f = self._files[shard]
        # get_slice reads only these rows from the memory-mapped file.
        ids = f.get_slice("ids")[begin:end].long()
        return ids, f.get_slice("logprobs")[begin:end]

    def num_targets(self, index: int) -> int:
        shard, row = divmod(index, self.shard_size)
        return int(self._offsets[shard][row + 1] - self._offsets[shard][row])


def cache_is_complete(directory: str | Path) -> bool:
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    num_shards = -(-meta["num_examples"] // meta["shard_size"])
    return all(_shard_path(directory, s).exists() for s in range(num_shards))
