"""Vocab-parallel fused ops, for a tensor-parallel lm_head.

Each rank of a process group holds a contiguous slice of the vocabulary rows of the
lm_head weight (``[V_r, H]``; the slices need not be equal, so ``V`` need not divide by
the world size) and the same hidden states and targets. Rank ``r``'s slice starts where
rank ``r - 1``'s ends: the offsets follow from each rank's ``weight.shape[0]``, gathered
once per call and read on the host (so these ops are not for CUDA graph capture). The
same all-gather checks that the ranks agree on the token count, shapes, dtypes and knobs,
and makes every rank raise when one rank's own slice is wrong, instead of leaving the
others waiting in a collective. :func:`vocab_shard_range` gives the usual even split.

Per chunk of rows, each rank computes its ``[chunk, V_r]`` logits only, and the row
statistics are combined across ranks:

* the logsumexp: the global row max (an all-reduce, or the max of the top-m
  candidates below), then an all-reduce of the partial sums of ``exp(z - max)``;
* the terms at the teacher's ids (and the label): each id's logit comes from the one
  rank that owns it (the others add an exact 0 to the same all-reduce);
* the student's exact top-m set M (``m`` ids, lowest global ids first among ties at the
  m-th value, the rule of the single-process op): every rank contributes its ``m``
  largest values per row; the m-th largest of the gathered candidates is the global
  threshold, and how many ids above it exist globally is read from the same candidates
  (a value above the threshold that a rank left out would mean that rank alone has m
  values above it). Each rank then keeps the tied ids left over by the ranks before it
  (lower global ids) and drops its own highest tied ids beyond that count.

The loss is the same on every rank. Backward gives each rank the gradient of its own
weight (and bias) slice, and the gradient of ``hidden`` already summed over the ranks
(do not all-reduce it again). Every rank must call the op with the same hidden states,
targets and knobs, and must backpropagate the same upstream gradient (compute the same
loss from the outputs on every rank), as with Megatron's vocab-parallel cross-entropy.

The row math runs in plain PyTorch (the chunked "torch" path) on any device, so there is
no ``backend`` argument; the per-chunk transient memory is one ``[chunk, V_r]`` block plus
its workspace, never ``[N, V_r]``. Collectives use ``torch.distributed`` (gloo on CPU,
NCCL on CUDA). With 16-bit compute (autocast, bf16 inputs) each rank's partial
``grad_hidden`` is in that dtype and summed in it, as tensor-parallel layers usually do:
where the partials cancel, the error is a 16-bit rounding of the partials, not of the sum.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from . import _backends
from . import _validation as V
from . import grpo as _grpo
from ._chunked import cast_operands, finish_grad, rows_per_chunk, run_chunks
from ._config import CKDConfig, RunOptions
from ._torch_rows import (
    _compute_dtype,
    _row_dot,
    _trim_ties,
    ckd_row_grad,
    ckd_row_loss,
    ckd_workspace_bytes,
    logprob_workspace_bytes,
    teacher_terms,
)
from .ckd import _check_ckd_args
from .logprobs import check_logprob_args

__all__ = ["vocab_parallel_linear_ckd_loss", "vocab_parallel_linear_grpo_loss",
           "vocab_parallel_linear_logprobs", "vocab_shard_range"]


def vocab_shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, end)`` of rank ``rank``'s rows in an even split of ``vocab_size`` rows:
    the first ``vocab_size % world_size`` ranks hold one row more. Slice the full weight
    with it (``weight[start:end]``); any other contiguous split in rank order works too."""
    for name, value in (("vocab_size", vocab_size), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if vocab_size < world_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than world_size={world_size}: "
                         "every rank needs at least one vocabulary row")
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(frozen=True)
class _Shard:
    """This rank's place in the vocabulary: ``[start, start + rows)`` of ``vocab`` rows."""

    group: object
    rank: int
    world: int
    start: int
    rows: int
    vocab: int
    max_rows: int  # the largest slice: sizes the chunks, so every rank runs the same ones

    def local(self, ids):
        """Global ids -> (local column, owned): column 0 where another rank owns the id."""
        local = ids.long() - self.start
        owned = (local >= 0) & (local < self.rows)
        return torch.where(owned, local, 0), owned

    def all_reduce(self, t, op=None):
        """In place (a sum unless ``op``); returns ``t``. (No ReduceOp default: torch builds
        without torch.distributed lack it, and importing star_kernels must not fail there.)"""
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return t

    def all_gather(self, t):
        """``[world, *t.shape]``: every rank's ``t``, in rank (= vocabulary) order."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)


def _shard_of(hidden, weight, bias, group, agree, knobs) -> _Shard:
    """This rank's vocabulary slice, from every rank's ``weight.shape[0]`` (one all-gather).

    The same all-gather makes every rank fail together instead of leaving the others
    waiting in a collective: when one rank's own arguments are wrong (its weight or bias
    slice), or the ranks disagree on ``agree`` (name -> function giving an int, e.g. the
    token count) or on ``knobs`` (every other setting, compared through a checksum of its
    ``repr``), every rank raises.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("the vocab-parallel ops need torch.distributed initialised "
                           "(torch.distributed.init_process_group) for group")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    try:  # the checks of what differs by rank; the replicated inputs are checked later
        V.check_linear(hidden, weight, None)
        _check_bias_shard(bias, weight)
        error, row = None, [weight.shape[0], *(f() for f in agree.values())]
    except (TypeError, ValueError) as err:
        error, row = err, [0] * (1 + len(agree))
    row = [error is not None, zlib.crc32(repr(knobs).encode()), *row]
    mine = torch.tensor(row, dtype=torch.int64,
                        device=hidden.device if isinstance(hidden, torch.Tensor) else "cpu")
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    # One host read per call; columns: failed, knobs checksum, slice rows, then `agree`.
    failed, checksums, sizes, *agreed = zip(*torch.stack(parts).tolist())
    if error is not None:
        raise error
    if any(failed):
        bad = [r for r, f in enumerate(failed) if f]
        raise ValueError(f"rank(s) {bad} of the group rejected their arguments (the error "
                         "there names the argument); no rank computes")
    if min(sizes) < 1:
        raise ValueError(f"weight: every rank needs at least one vocabulary row, got slices "
                         f"of {list(sizes)} rows by rank")
    if len(set(checksums)) > 1:
        raise ValueError(f"the ranks disagree on the other arguments ({', '.join(knobs)}): "
                         "every rank must pass the same values")
    for name, values in zip(agree, agreed):
        if len(set(values)) > 1:
            raise ValueError(f"the ranks disagree on {name}: {list(values)} by rank; every "
                             "rank must pass the same hidden states, targets and knobs")
    return _Shard(group, rank, world, start=sum(sizes[:rank]), rows=sizes[rank],
                  vocab=sum(sizes), max_rows=max(sizes))


def _common_agreement(hidden, bias) -> dict:
    """What every op's ranks must agree on: the tokens, the hidden size, whether a bias."""
    return {"hidden (tokens)": lambda: hidden.shape[:-1].numel(),
            "hidden (size)": lambda: hidden.shape[-1], "bias (given)": lambda: bias is not None}


def _dtypes(*tensors):
    """Dtypes and whether a gradient is wanted: both set which collectives run."""
    return tuple((getattr(t, "dtype", None), getattr(t, "requires_grad", None))
                 for t in tensors)


def _full_weight_stand_in(weight, vocab):
    """A stride-0 ``[V, H]`` view with the full vocabulary's shape and the shard's dtype and
    device: the single-process argument checks (ids in ``[0, V)``, ``m <= V``) run on it
    unchanged. Its values are never read."""
    return weight.new_empty(()).expand(vocab, weight.shape[1])


def _check_bias_shard(bias, weight):
    if bias is not None and (not isinstance(bias, torch.Tensor)
                             or tuple(bias.shape) != (weight.shape[0],)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must be this rank's slice [V_r]=[{weight.shape[0]}] of the "
                         f"bias, matching weight, got {shape}")


def _run(shard, h, w, b, row_op, rows, scale, bytes_per_logit, budget, needs):
    """The chunk loop on this rank's slice, chunks sized by the largest slice (so every
    rank runs the same chunks and their collectives pair up), then ``grad_hidden``
    summed over the ranks."""
    chunk = rows_per_chunk(h.shape[0], shard.max_rows, bytes_per_logit, budget)
    outs, gh, gw, gb = run_chunks(h, w, b, row_op, rows, scale, chunk,
                                  need_grad_hidden=needs[0],
                                  need_grad_weight=needs[1] or needs[2])
    if gh is not None:
        shard.all_reduce(gh)
    return outs, gh, gw, gb


# ---------------------------------------------------------------------------- CKD


def _top_m_mask(z, m: int, shard: _Shard):
    """``([C, V_r] bool, [C, 1] global row max)``: this rank's part of the row's exact top-m
    set (see the module docstring); ``z`` is this rank's scaled logits."""
    k = min(m, z.shape[1])
    cand = z.topk(k, dim=1, sorted=False).values
    if k < m:  # all_gather needs one shape on every rank; -inf never beats a real value
        cand = torch.nn.functional.pad(cand, (0, m - k), value=float("-inf"))
    cand = shard.all_gather(cand).permute(1, 0, 2).reshape(z.shape[0], shard.world * m)
    threshold = cand.topk(m, dim=1, sorted=False).values.amin(1, keepdim=True)
    above = (cand > threshold).sum(1, dtype=torch.int32)  # exact: see the module docstring
    ties = (z == threshold).sum(1, dtype=torch.int32)
    ties_before = shard.all_gather(ties)[:shard.rank].sum(0, dtype=torch.int32)
    take = torch.minimum((m - above - ties_before).clamp_min(0), ties)
    confident = z >= threshold
    _trim_ties(z, confident, threshold, ties - take)  # keeps the lowest `take` tied ids
    return confident, cand.amax(1, keepdim=True)


def _ckd_rows(logits, teacher_ids, teacher_logprobs, labels, grad_scale, *, cfg: CKDConfig,
              shard: _Shard):
    """Per-row CKD loss of this rank's ``[C, V_r]`` logits chunk (the same on every rank)
    and the gradient in this rank's logits, in place. The math after the all-reduce is
    :func:`star_kernels._torch_rows.ckd_rows`'s, on the combined row statistics."""
    ctype = _compute_dtype(logits.dtype)
    z = logits if logits.dtype == ctype else logits.to(ctype)
    if cfg.temperature != 1.0:
        z.mul_(1.0 / cfg.temperature)
    lam, mix, k = cfg.tail_coef, cfg.kd_ratio, teacher_ids.shape[1]

    confident, row_max = _top_m_mask(z, cfg.student_topm, shard)
    ids, owned = shard.local(teacher_ids)
    # Per row, one all-reduce of: sum exp(z - max), its part on M, and at each teacher id
    # (from its owner, exact 0 elsewhere) the logit and whether it is in M; the label's logit.
    parts = [torch.where(owned, z.gather(1, ids), 0.0), (owned & confident.gather(1, ids))]
    if mix < 1.0:
        keep = (labels != cfg.ignore_index).to(ctype)
        label, label_owned = shard.local(torch.where(keep > 0, labels, 0)[:, None])
        parts.append(torch.where(label_owned, z.gather(1, label), 0.0))
    q = z.sub_(row_max).exp_()
    q_confident = torch.where(confident, q, 0.0)
    sums = torch.cat([q.sum(1, keepdim=True), q_confident.sum(1, keepdim=True),
                      *(p.to(ctype) for p in parts)], 1)
    shard.all_reduce(sums)
    sum_exp, mass_m, z_s, in_m, z_label = sums.split([1, 1, k, k, sums.shape[1] - 2 - 2 * k], 1)
    q.div_(sum_exp)
    q_confident.div_(sum_exp)
    lse = row_max + sum_exp.log()

    logq_s = z_s - lse
    tlp, ranked, p, q_s, fkl = teacher_terms(teacher_logprobs, logq_s, ctype)
    s_confident = (in_m > 0.5) & ranked
    ce = keep * (lse[:, 0] - z_label[:, 0]) if mix < 1.0 else None
    mistake_mass = mass_m[:, 0] / sum_exp[:, 0] - (q_s * s_confident).sum(1)
    loss, grad_terms = ckd_row_loss(cfg, tlp, ranked, p, logq_s, q_s, fkl, mistake_mass, ce)
    if grad_scale is None:
        return (loss,), None

    # As ckd_rows on this slice, the corrections only at the teacher ids and the label
    # this rank owns.
    s, dense, at_teacher, at_label = ckd_row_grad(cfg, grad_scale, q_s, s_confident, *grad_terms,
                                                  keep if mix < 1.0 else None, ctype)
    g = q.mul_(dense[:, None]).addcmul_(q_confident, (mix * lam) * s[:, None])
    g.scatter_add_(1, ids, torch.where(owned, at_teacher, 0.0))
    if at_label is not None:
        g.scatter_add_(1, label, torch.where(label_owned, at_label, 0.0))
    if g.data_ptr() != logits.data_ptr():
        logits.copy_(g)
    return (loss,), logits


@dataclass(frozen=True)
class _Options:
    run: RunOptions
    shard: _Shard
    reduction: str = "mean"
    cfg: CKDConfig | None = None
    temperature: float = 1.0
    want_entropy: bool = False


class _CKDFunction(torch.autograd.Function):
    """As :class:`star_kernels.ckd._CKDFunction`, on this rank's vocabulary slice."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_ids, teacher_logprobs, labels, row_weight,
                opts: _Options):
        run, needs = opts.run, ctx.needs_input_grad
        ctx.opts = opts
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        with _backends.no_autocast(hidden.device):
            h, w, b = cast_operands(hidden, weight, bias, run.compute_dtype)
            row_op = functools.partial(_ckd_rows, cfg=opts.cfg, shard=opts.shard)
            n = h.shape[0]
            rows = (teacher_ids, teacher_logprobs, labels)
            out_dtype = torch.promote_types(h.dtype, torch.float32)
            with_grad = opts.reduction != "none" and any(needs[:3])
            if row_weight is None:
                per_row = 1.0 / max(n, 1) if opts.reduction == "mean" else 1.0
                scale = h.new_full((n,), per_row, dtype=out_dtype) if with_grad else None
            else:
                row_weight = row_weight.to(out_dtype)
                per_row = (1.0 / row_weight.sum().clamp_min(1)
                           if opts.reduction == "mean" else 1.0)
                scale = row_weight * per_row if with_grad else None
            (losses,), gh, gw, gb = _run(opts.shard, h, w, b, row_op, rows, scale,
                                         ckd_workspace_bytes(h.dtype), run.memory_budget, needs)
        if row_weight is not None:
            losses = torch.where(row_weight > 0, losses * row_weight, 0.0)
        if opts.reduction == "none":
            # Per-token upstream gradients are only known in backward: recompute there
            # (every rank backpropagates, so the recomputation's collectives pair up).
            ctx.row_op = row_op
            ctx.save_for_backward(h, w, b, row_weight, *rows)
            return losses.to(out_dtype)
        ctx.save_for_backward(gh, gw, gb)
        return (losses.sum() * per_row).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        needs, opts = ctx.needs_input_grad, ctx.opts
        with _backends.no_autocast(grad_out.device):
            if opts.reduction == "none":
                h, w, b, row_weight, *rows = ctx.saved_tensors
                if row_weight is not None:
                    grad_out = grad_out * row_weight
                _, gh, gw, gb = _run(opts.shard, h, w, b, ctx.row_op, rows, grad_out,
                                     ckd_workspace_bytes(h.dtype), opts.run.memory_budget,
                                     needs)
                scale = None
            else:
                (gh, gw, gb), scale = ctx.saved_tensors, grad_out
            grads = [finish_grad(g, dtype, scale) if need else None
                     for g, dtype, need in zip((gh, gw, gb), ctx.dtypes, needs)]
        return (*grads, None, None, None, None, None)


def vocab_parallel_linear_ckd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tail_coef: float = 10.0,
    student_topm: int = 100,
    kd_ratio: float = 1.0,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    *,
    group=None,
    tail_bucket: bool = False,
    ignore_index: int = -100,
    kd_type: str = "fkl",
    memory_budget: int | None = None,
    validate: str = "auto",
) -> torch.Tensor:
    """:func:`star_kernels.fused_linear_ckd_loss` with the lm_head split by vocabulary rows
    over the ranks of ``group`` (default: the whole world); see the module docstring.

    ``weight`` is this rank's ``[V_r, H]`` slice (``bias`` its ``[V_r]`` slice), rank
    order = vocabulary order. ``hidden``, ``teacher_ids`` (global ids in ``[0, V)``),
    ``teacher_logprobs``, ``mask`` and ``labels`` are the full tensors, the same on every
    rank. Every knob means what it means in the single-process op, which this returns on
    every rank (up to rounding); there is no ``backend`` (the row math is plain PyTorch).
    ``memory_budget`` sizes chunks of ``[chunk, max V_r]``. Costs per call: one small
    all-gather of the slice sizes (read on the host), then per chunk of rows two
    all-gathers (top-m candidates ``[chunk, m]``, tie counts) and one all-reduce
    (``[chunk, 2K + 3]``), and one all-reduce of ``grad_hidden``.
    """
    cfg = CKDConfig(tail_coef=float(tail_coef), student_topm=student_topm,
                    kd_ratio=float(kd_ratio), temperature=float(temperature),
                    tail_bucket=bool(tail_bucket), ignore_index=ignore_index,
                    kd_type=kd_type)
    k = teacher_ids.shape[-1] if isinstance(teacher_ids, torch.Tensor) else -1
    shard = _shard_of(hidden, weight, bias, group,
                      {**_common_agreement(hidden, bias), "teacher_ids (K)": lambda: k},
                      {**asdict(cfg), "reduction": reduction, "memory_budget": memory_budget,
                       "dtypes": _dtypes(hidden, weight, bias)})
    checks = _check_ckd_args(hidden, _full_weight_stand_in(weight, shard.vocab), teacher_ids,
                             teacher_logprobs, mask, None, labels, cfg, reduction,
                             memory_budget, validate)
    if checks is not None:
        checks.run()
    run = RunOptions("torch", memory_budget or _backends.default_memory_budget(hidden.device),
                     _backends.compute_dtype(hidden, weight, bias))
    opts = _Options(run, shard, reduction, cfg)

    token_shape = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    ids, lps = teacher_ids.reshape(-1, k), teacher_logprobs.reshape(-1, k)
    lab = None if labels is None or cfg.kd_ratio == 1.0 else labels.reshape(-1)
    rows = row_weight = None
    if mask is not None:
        keep = mask.reshape(-1) != 0
        if _backends.host_sync_forbidden(hidden.device):
            row_weight = keep
        else:  # the same rows on every rank: the mask is the same everywhere
            rows = keep.nonzero().squeeze(1)
            h, ids, lps = h[rows], ids[rows], lps[rows]
            lab = None if lab is None else lab[rows]
    out = _CKDFunction.apply(h, weight, bias, ids, lps, lab, row_weight, opts)
    if reduction != "none":
        return out
    if rows is not None:
        out = out.new_zeros(keep.shape[0]).index_copy(0, rows, out)
    return out.reshape(token_shape)


# ---------------------------------------------------------------------------- log-probs


def _logprob_rows(logits, token_ids, grad_scale, *, temperature, want_entropy, shard: _Shard):
    """Per-row ``log q[id]`` and entropy from this rank's ``[C, V_r]`` logits chunk, and
    with ``grad_scale`` (``[C, 1]`` or ``[C, 2]``: upstream gradients of log-prob and
    entropy) the gradient in this rank's logits, in place, as
    :func:`star_kernels._torch_rows.logprob_rows` writes it for the full row."""
    ctype = _compute_dtype(logits.dtype)
    z = logits if logits.dtype == ctype else logits.to(ctype)
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    ids, owned = shard.local(token_ids[:, None])
    z_id = torch.where(owned, z.gather(1, ids), 0.0)
    row_max = shard.all_reduce(z.amax(1, keepdim=True), dist.ReduceOp.MAX)
    u = z.sub_(row_max)
    e = u.exp()
    # A -inf logit (a masked vocabulary row) has e = 0: floor u so that e * u is 0, not NaN.
    u.clamp_min_(-1e4)
    # With S = sum e and A = sum e * u over the whole row: log q = u - log S and the
    # entropy is log S - A / S.
    sums = shard.all_reduce(torch.stack([e.sum(1), _row_dot(e, u), z_id[:, 0]], 1))
    log_s = sums[:, 0].log()
    logp = sums[:, 2] - row_max[:, 0] - log_s
    entropy = log_s - sums[:, 1] / sums[:, 0]
    outs = (logp, entropy) if want_entropy else (logp,)
    if grad_scale is None:
        return outs, None
    inv_t = 1.0 / temperature
    gl = grad_scale[:, 0].to(ctype) * inv_t
    ge = grad_scale[:, 1].to(ctype) * inv_t if grad_scale.shape[1] > 1 else None
    q = e.div_(sums[:, :1])
    # d/dz of gl * log q[id] + ge * H = gl * (onehot - q) - ge * q * (log q + H)
    if ge is None:
        g = q.mul_(-gl[:, None])
    else:
        g = u.add_((entropy - log_s)[:, None]).mul_(-ge[:, None]).sub_(gl[:, None]).mul_(q)
    g.scatter_add_(1, ids, torch.where(owned, gl[:, None], 0.0))
    if g.data_ptr() != logits.data_ptr():
        logits.copy_(g)
    return outs, logits


class _LogprobsFunction(torch.autograd.Function):
    """As :class:`star_kernels.logprobs._LogprobsFunction`, on this rank's vocabulary slice."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, opts: _Options):
        ctx.opts = opts
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        with _backends.no_autocast(hidden.device):
            h, w, b = cast_operands(hidden, weight, bias, opts.run.compute_dtype)
            row_op = functools.partial(_logprob_rows, temperature=opts.temperature,
                                       want_entropy=opts.want_entropy, shard=opts.shard)
            outs, *_ = _run(opts.shard, h, w, b, row_op, (token_ids,), None,
                            logprob_workspace_bytes(h.dtype), opts.run.memory_budget,
                            (False, False, False))
        ctx.row_op = row_op
        ctx.save_for_backward(h, w, b, token_ids)
        out_dtype = torch.promote_types(h.dtype, torch.float32)
        outs = tuple(o.to(out_dtype) for o in outs)
        return outs if opts.want_entropy else outs[0]

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        h, w, b, token_ids = ctx.saved_tensors
        opts, needs = ctx.opts, ctx.needs_input_grad
        ctype = torch.promote_types(h.dtype, torch.float32)
        cols = [torch.zeros(h.shape[0], dtype=ctype, device=h.device) if grad_logp is None
                else grad_logp.to(ctype)]
        if opts.want_entropy and grad_entropy is not None:
            cols.append(grad_entropy.to(ctype))
        with _backends.no_autocast(h.device):
            _, gh, gw, gb = _run(opts.shard, h, w, b, ctx.row_op, (token_ids,),
                                 torch.stack(cols, 1), logprob_workspace_bytes(h.dtype),
                                 opts.run.memory_budget, needs)
            grads = [finish_grad(g, dtype) if need else None
                     for g, dtype, need in zip((gh, gw, gb), ctx.dtypes, needs)]
        return (*grads, None, None)


def vocab_parallel_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    bias: torch.Tensor | None = None,
    *,
    group=None,
    memory_budget: int | None = None,
    validate: str = "auto",
):
    """:func:`star_kernels.fused_linear_logprobs` with the lm_head split by vocabulary rows
    over the ranks of ``group``; see the module docstring and
    :func:`vocab_parallel_linear_ckd_loss` for the layout. ``token_ids`` are global ids.

    Returns ``logp`` (or ``(logp, entropy)``) in the token shape, the same on every rank.
    Per chunk of rows: two all-reduces (row max, then ``[chunk, 3]`` sums), forward and
    again in backward, plus one all-reduce of ``grad_hidden``.
    """
    shard = _shard_of(hidden, weight, bias, group, _common_agreement(hidden, bias),
                      {"temperature": temperature, "return_entropy": bool(return_entropy),
                       "memory_budget": memory_budget, "dtypes": _dtypes(hidden, weight, bias)})
    check_logprob_args(hidden, _full_weight_stand_in(weight, shard.vocab), token_ids, None,
                       temperature, memory_budget)
    checks = V.value_checks(validate, "vocab_parallel_logprobs", hidden.device)
    if checks is not None:
        V.check_ids_in_vocab(checks, "token_ids", token_ids, shard.vocab)
        checks.run()
    run = RunOptions("torch", memory_budget or _backends.default_memory_budget(hidden.device),
                     _backends.compute_dtype(hidden, weight, bias))
    opts = _Options(run, shard, temperature=float(temperature),
                    want_entropy=bool(return_entropy))
    token_shape = hidden.shape[:-1]
    out = _LogprobsFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                  token_ids.reshape(-1), opts)
    if return_entropy:
        return out[0].reshape(token_shape), out[1].reshape(token_shape)
    return out.reshape(token_shape)



# ---------------------------------------------------------------------------- GRPO


def vocab_parallel_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    clip_eps: float | tuple[float, float] = 0.2,
    kl_coef: float = 1e-3,
    kl_estimator: str = "k2",
    temperature: float = 1.0,
    loss_agg: str = "token_mean",
    bias: torch.Tensor | None = None,
    *,
    group=None,
    kl_clamp: float | None = 10.0,
    memory_budget: int | None = None,
    validate: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`star_kernels.fused_linear_grpo_loss` with the lm_head split by vocabulary rows
    over the ranks of ``group``; see :func:`vocab_parallel_linear_ckd_loss` for the layout.

    Returns ``(loss, diagnostics)`` as the single-process op, the same on every rank. Built
    on :func:`vocab_parallel_linear_logprobs` of the masked-in tokens: the per-token loss is
    an elementwise function of the log-probs, whose derivative (the single-process op's
    ``token_terms``) is fed to their backward, which recomputes the logits chunks (four
    GEMMs per chunk instead of the single-process op's three).
    """
    low, high = _grpo._clip_range(clip_eps)
    shard = _shard_of(hidden, weight, bias, group, _common_agreement(hidden, bias),
                      {"clip_eps": (low, high), "kl_coef": kl_coef, "kl_estimator": kl_estimator,
                       "temperature": temperature, "loss_agg": loss_agg, "kl_clamp": kl_clamp,
                       "memory_budget": memory_budget, "dtypes": _dtypes(hidden, weight, bias)})
    checks = _grpo._check_grpo_args(hidden, _full_weight_stand_in(weight, shard.vocab),
                                    token_ids, advantages, mask, old_logprobs, ref_logprobs,
                                    None, temperature, kl_coef, kl_estimator, loss_agg,
                                    memory_budget, validate, kl_clamp)
    if checks is not None:
        checks.run()
    run = RunOptions("torch", memory_budget or _backends.default_memory_budget(hidden.device),
                     _backends.compute_dtype(hidden, weight, bias))
    ctype = torch.promote_types(run.compute_dtype, torch.float32)
    n_seq, seq_len = (hidden.shape[0], hidden.shape[1]) if hidden.dim() == 3 \
        else (1, hidden.shape[0])
    rows = (mask.reshape(-1) != 0).nonzero().squeeze(1)  # the same rows on every rank
    count = max(rows.numel(), 1)
    per_sequence = hidden.dim() == 3 and advantages.dim() == 1
    adv = (advantages.to(ctype)[rows // seq_len] if per_sequence
           else advantages.reshape(-1).to(ctype)[rows])
    old, ref = (None if t is None else t.reshape(-1).to(ctype)[rows]
                for t in (old_logprobs, ref_logprobs))
    if loss_agg == "token_mean":
        token_weight = torch.full_like(adv, 1.0 / count)
    elif loss_agg == "dr_grpo":
        token_weight = torch.full_like(adv, 1.0 / max(n_seq * seq_len, 1))
    else:  # each present sequence's masked mean, averaged over present sequences
        seq = rows // seq_len
        lengths = torch.zeros(n_seq, dtype=ctype, device=adv.device).index_add_(
            0, seq, torch.ones_like(adv))
        token_weight = 1.0 / (lengths[seq] * (lengths > 0).sum().clamp_min(1))

    opts = _Options(run, shard, temperature=float(temperature))
    logp = _LogprobsFunction.apply(hidden.reshape(-1, hidden.shape[-1])[rows], weight, bias,
                                   token_ids.reshape(-1)[rows], opts).to(ctype)
    per_token, dloss, ratio, clip_active, kl = _grpo.token_terms(
        logp.detach(), adv, old, ref, low, high, kl_coef, kl_estimator,
        None if kl_clamp is None else float(kl_clamp))
    # The value of the weighted per-token losses, and their derivative in logp as the
    # single-process op defines it (on-policy, ratio = 1 has the gradient of logp).
    loss = (token_weight * per_token).sum() + (token_weight * dloss * (logp - logp.detach())).sum()

    def token_mean(x):
        return x.to(ctype).sum() / count

    diagnostics = {
        "clip_fraction": token_mean(clip_active),
        "mean_kl": torch.zeros((), dtype=ctype, device=hidden.device) if kl is None
        else token_mean(kl),
        "mean_ratio": token_mean(ratio),
        "logprobs": torch.zeros(token_ids.numel(), dtype=ctype, device=hidden.device)
        .index_copy_(0, rows, logp.detach()).view(token_ids.shape),
    }
    return loss, diagnostics
