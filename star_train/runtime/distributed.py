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
match in count. That is ``train.data_parallel = "ddp"``, the default.

``train.data_parallel = "fsdp2"`` shards the student instead (:func:`shard_model`, for one
whose weights, gradients and AdamW state do not fit one device): FSDP2 (``fully_shard``)
units for each decoder layer, the trunk, and an untied lm_head, so that the stages'
trunk-only path keeps working (the trunk's forward runs FSDP's hooks; the head weight is
all-gathered by ``star_kernels.hf.gathered`` and its gradient reduce-scattered back). Each
unit's collectives run in every forward and backward, so the trainer has every rank run
the same number of micro-batches (zero-scale repeats on the short ranks) and multiplies
the loss scales by ``world_size`` against FSDP2's gradient average; the gradients then are
shards (``DTensor``), clipped by their global norm, and AdamW holds only this rank's shard
of its state. Checkpoints stay in the full, unsharded format (:func:`full_model_state`,
:func:`full_optimizer_state` gathered for rank 0 to write; on resume each rank reads the
files and keeps its shard), so any checkpoint resumes on any world size in either mode. In
a world of one, ``fsdp2`` trains the unsharded model. Sim-RL is refused (its rollouts run a
different number of forwards on each rank).
"""

from __future__ import annotations

import atexit
import os
import sys
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
                atexit.register(_leave_process_group)
            _WORLD = World(rank, size, local)
    return _WORLD


def _leave_process_group() -> None:
    """Tear the process group down while the interpreter is whole: left to interpreter
    shutdown, its backend's threads can be destroyed in any order (gloo on CPU then
    sometimes aborts a rank at exit). No barrier: after an error the other ranks may be in
    another collective, and torchrun ends them anyway."""
    if dist.is_initialized():
        dist.destroy_process_group()


def main_only_log(log, world: World):
    """``log`` on rank 0, silence elsewhere (N copies of every progress line help nobody)."""
    return log if world.is_main else (lambda *_args, **_kwargs: None)


# --------------------------------------------------------------------------- FSDP2
# ``train.data_parallel = "fsdp2"``: the student sharded with ``fully_shard``.


def shard_model(model: torch.nn.Module) -> None:
    """Shard a causal LM with FSDP2 for the stages' trunk-only path, in place.

    The stages never call the model's ``forward``: ``predicting_rows`` runs the trunk
    (``model.model``) and hands the lm_head weight to a fused loss
    (``star_kernels.hf.hidden_states``). So the units follow that path: each decoder layer,
    then the trunk (embeddings, final norm; the root FSDP unit, whose forward is what the
    stages call, so FSDP's all-gather and reduce-scatter hooks run as usual), and an untied
    lm_head as its own unit, whose forward never runs: ``hf.gathered`` all-gathers its
    weight and autograd reduce-scatters its gradient back onto the shards (averaged, like
    every FSDP2 gradient). A head tied to the embedding (Qwen3-0.6B) is the embedding's
    sharded parameter, re-tied after sharding and gathered the same way. The causal LM
    itself is not an FSDP unit, so the ``hf`` helpers do not refuse it.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from star_kernels.hf import decoder_and_head

    trunk, head = decoder_and_head(model)
    layers = getattr(trunk, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"train.data_parallel = fsdp2 needs a trunk with decoder `layers`; "
                        f"{type(trunk).__name__} has none")
    # Names that alias another's parameter (tied embeddings): fully_shard replaces the
    # parameters of the modules it wraps only, so an alias outside the unit is re-pointed.
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    trunk_params = {id(p) for p in trunk.parameters()}
    tied_head = [n for n, p in head.named_parameters() if id(p) in trunk_params]
    if tied_head and any(id(p) not in trunk_params for p in head.parameters()):
        raise NotImplementedError("train.data_parallel = fsdp2: an lm_head tied to the "
                                  "embedding with a parameter of its own (a bias) is not handled")
    for layer in layers:
        fully_shard(layer)
    fully_shard(trunk)
    if not tied_head and any(True for _ in head.parameters()):
        fully_shard(head)
    for alias, name in aliases.items():
        _set_parameter(model, alias, model.get_parameter(name))
    plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:  # a replicated parameter would never have its gradient synchronised
        raise NotImplementedError(f"train.data_parallel = fsdp2: parameters outside the trunk "
                                  f"and lm_head are not handled: {plain}")


def _set_parameter(model: torch.nn.Module, name: str, param) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, param)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (``DTensor``)."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full(t: torch.Tensor) -> torch.Tensor:
    """A ``DTensor`` all-gathered (a collective: every rank calls it), on the CPU."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def full_model_state(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the CPU, gathered one tensor at a time (a collective:
    every rank calls it; ``keep=False`` on the ranks that do not write, which then hold
    one tensor at a time and return ``{}``). Tied names share one tensor, as in the
    unsharded model, so ``safetensors`` stores them once exactly like ``save_model``."""
    done: dict[int, torch.Tensor | None] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in done:
            full = _full(t)  # on every rank, in the same order
            done[id(t)] = full if keep else None
    if not keep:
        return {}
    return {name: done[id(t)] for name, t in model.state_dict(keep_vars=True).items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor all-gathered: the
    single-process format (a collective; ``keep`` as for :func:`full_model_state`)."""
    state = optimizer.state_dict()
    gathered = {}
    for index, entry in state["state"].items():
        entry = {key: _full(value) if isinstance(value, torch.Tensor) else value
                 for key, value in entry.items()}
        if keep:
            gathered[index] = entry
    return {**state, "state": gathered} if keep else {}


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) as a ``DTensor`` laid out like ``like``; no
    communication: each rank keeps its own chunk."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full.to(like.device)
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh,
                             like.placements, src_data_rank=None)


def load_full_model_state(model: torch.nn.Module, read) -> None:
    """Copy the unsharded tensors ``read(name)`` returns (None: absent) into a sharded
    model, each rank keeping its chunk; a tied name absent from the file takes the tensor
    of the name it aliases. Raises for a missing tensor."""
    params = model.state_dict(keep_vars=True)
    loaded: set[int] = set()
    missing = []
    with torch.no_grad():
        for name, target in params.items():
            if id(target) in loaded:
                continue
            full = read(name)
            if full is None:
                missing.append(name)
                continue
            target.copy_(_shard_like(full, target))
            loaded.add(id(target))
    missing = [n for n in missing if id(params[n]) not in loaded]
    if missing:
        raise RuntimeError(f"the checkpoint lacks {missing}")


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A single-process ``optimizer.state_dict()`` with each state tensor shaped like its
    parameter sharded like that parameter, for ``optimizer.load_state_dict``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {**state, "state": dict(state["state"])}
    for index, entry in state["state"].items():
        p = params[int(index)]
        state["state"][index] = {
            key: _shard_like(value, p) if isinstance(value, torch.Tensor)
            and value.shape == p.shape and value.dim() else value
            for key, value in entry.items()}
    return state


# --------------------------------------------------------------------------- work split
# Rollouts and eval: each rank does a share of independent pieces of work, and the
# pieces are merged in their single-process order.


def wait_for_files(paths, poll_s: float = 1.0) -> None:
    """Return once every path in ``paths`` exists (files other ranks write, each renamed
    into place when whole). It polls the shared output folder instead of calling a
    collective: a rank that finishes its share early may wait longer than a process
    group's timeout (NCCL's default is 10 minutes) for a slower rank's last long piece. A rank
    that fails ends the torchrun job, so the wait does not outlive it."""
    import time

    pending = [p for p in paths if not os.path.exists(p)]
    while pending:
        time.sleep(poll_s)
        pending = [p for p in pending if not os.path.exists(p)]


def in_rounds(world: World, pieces: list, run):
    """``run(piece)`` for every piece, split over the ranks, yielded as ``(piece,
    result)`` on every rank in the order of ``pieces``. The pieces go in rounds of ``world_size``:
    rank ``r`` runs piece ``r`` of each round and one ``all_gather`` per round brings the
    results together, so a caller can store each round's results before the next (an
    interrupted job keeps every finished round) and no rank waits more than one piece
    for another (every rank must iterate to the end: each round is a collective). In a
    world of one, one piece at a time with no collective."""
    size = world.world_size
    for first in range(0, len(pieces), size):
        batch = pieces[first:first + size]
        mine = run(batch[world.rank]) if world.rank < len(batch) else None
        results = world.all_gather(mine)
        yield from zip(batch, results)
