"""Data parallelism under ``torchrun``: one process per device, every rank the same step.

``torchrun --nproc-per-node N -m star_train ckd --config ...`` (or the ``star-train``
script) sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; :func:`current` then joins the
process group (NCCL on CUDA, gloo on CPU) once per process. Without those variables it is
a world of one and every function here is a no-op, so the single-process path is the same
code.

How a step is split (``runtime.trainer``): a stage's plan is a pure function of the step
(``runtime.schedule``), so every rank computes the same plan and takes every
``world_size``-th micro-batch of it; each rank accumulates its micro-batches' gradients
with the *global* loss scales, and one summed all-reduce of the gradients per optimizer
step gives every rank the gradient one process would have computed. The optimizer steps
are then identical on every rank, and only rank 0 writes logs, checkpoints and ``final/``.

Why not the ``DistributedDataParallel`` wrapper: the stages run the model's trunk and hand
the lm_head *weight* to a fused loss (``predicting_rows``), never the wrapper's
``forward``, which DDP's gradient hooks depend on; and with gradient accumulation DDP
synchronises only on the last micro-batch anyway (``no_sync`` on the others), so the
one bucketed all-reduce per step costs the same traffic and loses only the overlap with
that last backward. Ranks may hold different numbers of micro-batches (a step with fewer
micro-batches than ranks): the all-reduce comes after accumulation, so nothing has to
match in count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_BUCKET_ELEMENTS = 1 << 24  # 64 MB of fp32 per all-reduce: few calls, bounded extra memory


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """``train.device`` for this rank: ``auto``/``cuda`` mean this rank's own GPU."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def share(self, items: list) -> list:
        """This rank's part of ``items``: every ``world_size``-th from position ``rank``."""
        return items[self.rank::self.world_size]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64, so sums of token counts
        and losses are exact enough to log)."""
        if not self.enabled or not values:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (small Python objects: rollouts' results)."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def sum_gradients(self, parameters) -> None:
        """Sum the ``.grad`` of ``parameters`` over the ranks in place (a rank that ran no
        micro-batch contributes zeros); every rank must pass the same parameters in the
        same order."""
        if not self.enabled:
            return
        params = [p for p in parameters if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket, size = [], 0
        for p in params:
            bucket.append(p.grad)
            size += p.grad.numel()
            if size >= _BUCKET_ELEMENTS:
                _all_reduce_flat(bucket)
                bucket, size = [], 0
        if bucket:
            _all_reduce_flat(bucket)

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's weights everywhere: the ranks start from the same model even if its
        construction was seeded differently (``torch.manual_seed`` per rank)."""
        if not self.enabled:
            return
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce_flat(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


_WORLD: World | None = None


def current() -> World:
    """This process's place in the torchrun job (joined on the first call), or a world of
    one when not started by torchrun."""
    global _WORLD
    if _WORLD is None:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            _WORLD = World()
        else:
            rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
            if not dist.is_initialized():
                cuda = torch.cuda.is_available()
                if cuda:
                    torch.cuda.set_device(local)
                dist.init_process_group("nccl" if cuda else "gloo")
            _WORLD = World(rank, size, local)
    return _WORLD


def main_only_log(log, world: World):
    """``log`` on rank 0, silence elsewhere (N copies of every progress line help nobody)."""
    return log if world.is_main else (lambda *_args, **_kwargs: None)
