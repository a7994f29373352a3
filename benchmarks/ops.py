"""What is benchmarked: inputs, the naive computations, and every implementation per op.

(Over 400 lines: every row of every op is here, one small class each, so that the
implementations compared in one table are read in one file.)

An implementation is built from a :class:`Case` and its inputs and exposes
``forward()`` (returns the op's output; a scalar loss for ops that train) and
``backward(out)``. ``unavailable(case)`` says why it cannot run
here (``"not installed: ..."``, ``"not available: ..."``) or returns ``None``.

Ops:

- ``ckd``: STAR's CKD loss (top-k forward KL + confident-error penalty), mean over tokens.
- ``topk``: teacher top-k of the log-softmax (ids and log-probs); forward only, no grad.
- ``logprobs``: log-probs of given token ids; the benchmarked loss is their sum.
- ``grpo``: GRPO/PPO clipped loss with a k2 KL penalty to a reference, masked token mean.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from star_kernels import reference

OPS = ("ckd", "topk", "logprobs", "grpo")
# Forward-only ops (run under torch.no_grad, timed and measured in "fwd" mode only).
FORWARD_ONLY = {"topk"}
SEQ_LEN = 512  # GRPO: tokens per sequence (STAR's max response length) when N allows it

TAIL_COEF = 10.0
CLIP_EPS = 0.2
KL_COEF = 1e-3


@dataclass(frozen=True)
class Case:
    op: str
    n: int
    h: int
    v: int
    k: int = 100
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


def modes_for(op: str) -> tuple[str, ...]:
    return ("fwd",) if op in FORWARD_ONLY else ("fwd", "bwd", "fwdbwd")


# ---------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------

def distinct_ids(n: int, v: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, k]`` ids, distinct within each row, without an ``[n, v]`` temporary."""
    stride = max(1, v // k)
    base = torch.randint(0, v, (n, 1), generator=gen)
    return (base + torch.arange(k) * stride) % v


def make_inputs(case: Case) -> dict:
    """Deterministic inputs on ``case.device``; ``hidden`` and ``weight`` require grad
    unless the op is forward-only. Logits come out with a standard deviation near 2."""
    gen = torch.Generator().manual_seed(case.seed)
    dt, dev = case.torch_dtype, torch.device(case.device)
    n, h, v, k = case.n, case.h, case.v, case.k
    grad = case.op not in FORWARD_ONLY
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (2.0 / h ** 0.5)
    out = {
        "hidden": hidden.to(dev, dt).requires_grad_(grad),
        "weight": weight.to(dev, dt).requires_grad_(grad),
    }
    if case.op == "ckd":
        ids = distinct_ids(n, v, k, gen)
        # Full-vocabulary log-probs: k entries plus an unseen tail, sorted descending.
        lp = torch.log_softmax(torch.randn(n, k + 1, generator=gen) * 2.0, dim=1)[:, :k]
        out["teacher_ids"] = ids.to(dev)
        out["teacher_logprobs"] = lp.sort(dim=1, descending=True).values.to(dev)
    elif case.op in ("logprobs", "grpo"):
        out["token_ids"] = torch.randint(0, v, (n,), generator=gen).to(dev)
    if case.op == "grpo":
        t = SEQ_LEN if n % SEQ_LEN == 0 else n
        seq_adv = torch.randn(n // t, generator=gen)
        out["seq_advantages"] = seq_adv.to(dev)
        out["advantages"] = seq_adv.repeat_interleave(t).to(dev)
        out["mask"] = torch.ones(n, dtype=torch.bool, device=dev)
        out["ref_logprobs"] = (-3.0 + torch.randn(n, generator=gen)).to(dev)
        out["seq_len"] = t
    return out


def leaves(inputs: dict) -> list[torch.Tensor]:
    return [t for t in (inputs["hidden"], inputs["weight"]) if t.requires_grad]


# ---------------------------------------------------------------------------------
# Naive full-logits computations (eager; also what torch.compile compiles)
# ---------------------------------------------------------------------------------

def naive_ckd(hidden, weight, teacher_ids, teacher_logprobs, *, student_topm):
    return reference.fused_linear_ckd_loss(hidden, weight, teacher_ids, teacher_logprobs,
                                           tail_coef=TAIL_COEF, student_topm=student_topm)


def naive_ckd_rows(hidden, weight, teacher_ids, teacher_logprobs, *, student_topm):
    """Per-token CKD losses (what the chunked variant sums per chunk)."""
    return reference.ckd_token_losses(hidden @ weight.T, teacher_ids, teacher_logprobs,
                                      tail_coef=TAIL_COEF, student_topm=student_topm)


def naive_topk(hidden, weight, k, temperature=1.0):
    return reference.fused_linear_topk_logprobs(hidden, weight, k, temperature)


def naive_logprobs_rows(hidden, weight, token_ids, temperature=1.0):
    return reference.fused_linear_logprobs(hidden, weight, token_ids, temperature)


def grpo_token_losses(logp, advantages, old_logprobs=None, ref_logprobs=None,
                      clip_eps=CLIP_EPS, kl_coef=KL_COEF):
    """PPO clipped surrogate plus ``kl_coef`` times the k2 estimator (clamped to [-10, 10]
    per token, the fused op's and the released default), per token."""
    return reference.grpo_token_losses(logp, advantages, old_logprobs, ref_logprobs,
                                       clip_eps=clip_eps, kl_coef=kl_coef, kl_estimator="k2",
                                       kl_clamp=10.0)


def naive_grpo_rows(hidden, weight, token_ids, advantages, ref_logprobs):
    logp = naive_logprobs_rows(hidden, weight, token_ids)
    return grpo_token_losses(logp, advantages, ref_logprobs=ref_logprobs)


def naive_grpo(hidden, weight, token_ids, advantages, mask, ref_logprobs):
    return reference.fused_linear_grpo_loss(hidden, weight, token_ids, advantages, mask,
                                            ref_logprobs=ref_logprobs, clip_eps=CLIP_EPS,
                                            kl_coef=KL_COEF, kl_estimator="k2")[0]


# ---------------------------------------------------------------------------------
# Chunked variant: grad-in-forward over row chunks, each chunk a compiled function
# ---------------------------------------------------------------------------------

class _ChunkedGradInForward(torch.autograd.Function):
    """``sum_r scale * rows_fn(h_r, W, *row_inputs)`` with gradients computed chunk by
    chunk inside the forward (as Liger's chunked losses do): one chunk of logits lives
    at a time. ``step(h, W, *rows)`` returns ``((grad_h, grad_W), value)``."""

    @staticmethod
    def forward(ctx, hidden, weight, step, chunk_rows, scale, *row_inputs):
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_rows):
            end = min(n, start + chunk_rows)
            rows = [t[start:end] for t in row_inputs]
            (gh, gw), value = step(hidden[start:end], weight, *rows)
            total += value.float()
            if grad_h is not None:
                grad_h[start:end] = gh * scale
            grad_w += gw.float()
        ctx.n_rows = len(row_inputs)
        ctx.save_for_backward(grad_h, (grad_w * scale).to(weight.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        return gh, grad_w * grad_out.to(grad_w.dtype), None, None, None, *[None] * ctx.n_rows


def _sum_rows(rows_fn):
    def total(h, w, *rows):
        return rows_fn(h, w, *rows).float().sum()
    return total


@functools.lru_cache(maxsize=None)
def compiled_grad_step(rows_fn):
    return torch.compile(torch.func.grad_and_value(_sum_rows(rows_fn), argnums=(0, 1)))


def chunk_rows_for(case: Case, budget: int | None = None) -> int:
    """Rows per chunk: one fp32 logits chunk plus ~3 same-size temporaries in the budget
    (1 GiB on CUDA, 256 MiB on CPU, the star_kernels defaults)."""
    if budget is None:
        budget = (1 << 30) if case.device.startswith("cuda") else (256 << 20)
    return max(1, min(case.n, budget // (case.v * 4 * 4)))


# ---------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------

class Impl:
    """One implementation of one op. Subclasses set ``id``, ``label`` and ``ops``."""

    id = ""
    label = ""
    ops: tuple[str, ...] = OPS
    note = ""

    def __init__(self, case: Case, inputs: dict, **options):
        self.case, self.inputs, self.options = case, inputs, options

    @classmethod
    def unavailable(cls, case: Case) -> str | None:
        return None

    def forward(self):
        raise NotImplementedError

    def backward(self, out):
        out.backward()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class Naive(Impl):
    id, label = "naive", "naive (eager)"
    note = "full [N, V] logits, autograd"

    def fn(self):
        return {"ckd": functools.partial(naive_ckd, student_topm=self.case.k),
                "topk": naive_topk, "logprobs": naive_logprobs_rows,
                "grpo": naive_grpo}[self.case.op]

    def forward(self):
        i, op, f = self.inputs, self.case.op, self._fn
        if op == "ckd":
            return f(i["hidden"], i["weight"], i["teacher_ids"], i["teacher_logprobs"])
        if op == "topk":
            return f(i["hidden"], i["weight"], self.case.k)
        if op == "logprobs":
            return f(i["hidden"], i["weight"], i["token_ids"]).sum()
        return f(i["hidden"], i["weight"], i["token_ids"], i["advantages"], i["mask"],
                 i["ref_logprobs"])

    def __init__(self, case, inputs, **options):
        super().__init__(case, inputs, **options)
        self._fn = self.fn()


class Compiled(Naive):
    id, label = "compiled", "naive (torch.compile)"
    note = "the naive computation under torch.compile (default mode)"

    def fn(self):
        return torch.compile(super().fn())


class ChunkedCompiled(Impl):
    id, label = "chunked_compiled", "chunked (torch.compile)"
    note = "row chunks, grad-in-forward via torch.func.grad_and_value, compiled per chunk"

    def __init__(self, case, inputs, **options):
        super().__init__(case, inputs, **options)
        self.chunk = options.get("chunk_rows") or chunk_rows_for(case)
        if case.op == "topk":
            self._topk = torch.compile(naive_topk)

    def forward(self):
        i, op, n = self.inputs, self.case.op, self.case.n
        h, w = i["hidden"], i["weight"]
        if op == "topk":
            parts = [self._topk(h[s:s + self.chunk], w, self.case.k)
                     for s in range(0, n, self.chunk)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if op == "ckd":
            fn = functools.partial(naive_ckd_rows, student_topm=self.case.k)
            rows, scale = (i["teacher_ids"], i["teacher_logprobs"]), 1.0 / n
        elif op == "logprobs":
            fn, rows, scale = naive_logprobs_rows, (i["token_ids"],), 1.0
        else:
            fn = naive_grpo_rows
            rows = (i["token_ids"], i["advantages"], i["ref_logprobs"])
            scale = 1.0 / max(1, int(i["mask"].sum()))  # the benchmark's mask is all true
        step = compiled_grad_step(_cache_key(fn))
        return _ChunkedGradInForward.apply(h, w, step, self.chunk, scale, *rows)


@functools.lru_cache(maxsize=None)
def _ckd_rows_m(m):
    return functools.partial(naive_ckd_rows, student_topm=m)


def _cache_key(fn):
    # functools.partial objects are not hashable by value; map CKD's to one per m.
    if isinstance(fn, functools.partial):
        return _ckd_rows_m(fn.keywords["student_topm"])
    return fn


_STAR_FN = {"ckd": "fused_linear_ckd_loss", "topk": "fused_linear_topk_logprobs",
            "logprobs": "fused_linear_logprobs", "grpo": "fused_linear_grpo_loss"}


class Star(Impl):
    backend = ""
    note = "star_kernels fused op"

    @classmethod
    def unavailable(cls, case):
        import star_kernels
        from star_kernels import _backends
        name = _STAR_FN[case.op]
        if not hasattr(star_kernels, name):
            return f"not available: star_kernels has no {name} yet"
        if cls.backend == "triton" and not case.device.startswith("cuda"):
            return ("not available: the triton backend needs CUDA here (TRITON_INTERPRET=1 "
                    "runs it on CPU, far too slowly to benchmark)")
        try:
            _backends.resolve(cls.backend, torch.device(case.device))
        except Exception as exc:  # BackendUnavailableError
            return f"not available: {exc}"
        return None

    kd_type = "fkl"

    def forward(self):
        import star_kernels as sk
        i, op, b = self.inputs, self.case.op, self.backend
        if op == "ckd":
            return sk.fused_linear_ckd_loss(i["hidden"], i["weight"], i["teacher_ids"],
                                            i["teacher_logprobs"], tail_coef=TAIL_COEF,
                                            student_topm=self.case.k, backend=b,
                                            kd_type=self.kd_type)
        if op == "topk":
            return sk.fused_linear_topk_logprobs(i["hidden"], i["weight"], self.case.k,
                                                 backend=b)
        if op == "logprobs":
            return sk.fused_linear_logprobs(i["hidden"], i["weight"], i["token_ids"],
                                            backend=b).sum()
        out = sk.fused_linear_grpo_loss(i["hidden"], i["weight"], i["token_ids"],
                                        i["advantages"], i["mask"],
                                        ref_logprobs=i["ref_logprobs"], clip_eps=CLIP_EPS,
                                        kl_coef=KL_COEF, kl_estimator="k2", backend=b)
        return out[0] if isinstance(out, tuple) else out


def _needs_cuda(case: Case, what: str) -> str | None:
    """Triton-only kernels fail on CPU tensors with Triton's '0 active drivers' error;
    say why instead (TRITON_INTERPRET would run them, far too slowly to time)."""
    if case.device.startswith("cuda"):
        return None
    return f"not available: {what} is a Triton kernel and needs CUDA"


def _star(backend):
    return type(f"Star_{backend}", (Star,), {
        "id": f"star_{backend}", "label": f"star_kernels [{backend}]", "backend": backend})


StarTorch, StarCpp, StarTriton = _star("torch"), _star("cpp"), _star("triton")


def _star_kd(backend, kd_type):
    """The CKD op with another divergence on the teacher's entries (issue 12): compare
    with the ``star_{backend}`` row (fkl) of the same run."""
    return type(f"Star_{backend}_{kd_type}", (Star,), {
        "id": f"star_{backend}_{kd_type}", "label": f"star_kernels [{backend}] {kd_type}",
        "backend": backend, "kd_type": kd_type, "ops": ("ckd",),
        "note": f"the CKD op with kd_type={kd_type!r} (+ {TAIL_COEF:g} x confident-error "
                "mass, as the fkl rows)"})


STAR_KD_TYPES = [_star_kd(b, t) for b in ("torch", "cpp", "triton") for t in ("rkl", "akl")]


class _Liger(Impl):
    """Liger-Kernel's losses: reported as not installed without the package."""

    @classmethod
    def unavailable(cls, case):
        return None if _installed("liger_kernel") else "not installed: liger-kernel"


class LigerFLCE(_Liger):
    id, label = "liger_flce", "Liger fused linear CE"
    ops = ("ckd", "logprobs")
    note = "cross-entropy on one label per token (not CKD); Triton, CUDA only"

    @classmethod
    def unavailable(cls, case):
        return super().unavailable(case) or _needs_cuda(case, "liger-kernel's fused linear CE")

    def __init__(self, case, inputs, **options):
        super().__init__(case, inputs, **options)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        red = "sum" if case.op == "logprobs" else "mean"
        self.loss = LigerFusedLinearCrossEntropyLoss(reduction=red)
        i = inputs
        self.target = i["teacher_ids"][:, 0].contiguous() if case.op == "ckd" else i["token_ids"]

    def forward(self):
        out = self.loss(self.inputs["weight"], self.inputs["hidden"], self.target)
        return out[0] if isinstance(out, tuple) else out


class LigerJSD(_Liger):
    id, label = "liger_jsd", "Liger fused linear JSD"
    ops = ("ckd",)
    note = ("forward KL (beta=0) against a full teacher distribution: also runs the "
            "teacher lm_head (teacher H = student H here), chunked + torch.compile")

    def __init__(self, case, inputs, **options):
        super().__init__(case, inputs, **options)
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        self.loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                            beta=0.0)
        gen = torch.Generator().manual_seed(case.seed + 1)
        h = inputs["hidden"]
        self.teacher_hidden = torch.randn(h.shape, generator=gen).to(h.device, h.dtype)
        w = inputs["weight"]
        self.teacher_weight = (torch.randn(w.shape, generator=gen) * (2.0 / case.h ** 0.5)
                               ).to(w.device, w.dtype)
        self.labels = inputs["teacher_ids"][:, 0].contiguous()

    def forward(self):
        out = self.loss(self.inputs["hidden"], self.inputs["weight"], self.teacher_hidden,
                        self.teacher_weight, self.labels)
        return out[0] if isinstance(out, tuple) else out


class LigerGRPO(_Liger):
    id, label = "liger_grpo", "Liger fused linear GRPO"
    ops = ("grpo",)
    note = ("loss_type='bnpo' (token mean), beta=1e-3 with given ref log-probs (Liger's "
            "k3 KL), one 512-token sequence per chunk, torch.compile")

    def __init__(self, case, inputs, **options):
        super().__init__(case, inputs, **options)
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        self.loss = LigerFusedLinearGRPOLoss(beta=KL_COEF, epsilon_low=CLIP_EPS,
                                             epsilon_high=CLIP_EPS, loss_type="bnpo",
                                             use_ref_model=True)
        t = inputs["seq_len"]
        b = case.n // t
        self.shape = (b, t)
        i = inputs
        self.ids = i["token_ids"].view(b, t)
        self.mask = i["mask"].view(b, t).long()
        self.ref = i["ref_logprobs"].view(b, t).float()

    def forward(self):
        i = self.inputs
        h = i["hidden"].view(*self.shape, -1)
        out = self.loss(h, i["weight"], self.ids, self.mask, i["seq_advantages"],
                        ref_per_token_logps=self.ref)
        return out[0] if isinstance(out, tuple) else out


class TorchLCE(Impl):
    id, label = "torch_lce", "torch linear_cross_entropy (chunked)"
    ops = ("ckd", "logprobs")
    note = "torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions(); CE, not CKD"

    @classmethod
    def unavailable(cls, case):
        if not hasattr(F, "linear_cross_entropy"):
            return f"not available: torch {torch.__version__} has no F.linear_cross_entropy"
        return None

    def __init__(self, case, inputs, **options):
        super().__init__(case, inputs, **options)
        opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        self.kwargs = {"options": opts()} if opts is not None else {}
        self.reduction = "sum" if case.op == "logprobs" else "mean"
        i = inputs
        self.target = i["teacher_ids"][:, 0].contiguous() if case.op == "ckd" else i["token_ids"]

    def forward(self):
        return F.linear_cross_entropy(self.inputs["hidden"], self.inputs["weight"],
                                      self.target, reduction=self.reduction, **self.kwargs)


class CCE(Impl):
    id, label = "cce", "cut-cross-entropy"
    ops = ("ckd", "logprobs")
    note = "Apple's cut_cross_entropy.linear_cross_entropy, default impl (Triton, CUDA); CE, not CKD"

    @classmethod
    def unavailable(cls, case):
        if not _installed("cut_cross_entropy"):
            return "not installed: cut-cross-entropy"
        return _needs_cuda(case, "cut-cross-entropy's default impl")

    def __init__(self, case, inputs, **options):
        super().__init__(case, inputs, **options)
        i = inputs
        self.target = i["teacher_ids"][:, 0].contiguous() if case.op == "ckd" else i["token_ids"]
        self.reduction = "sum" if case.op == "logprobs" else "mean"

    def forward(self):
        from cut_cross_entropy import linear_cross_entropy
        return linear_cross_entropy(self.inputs["hidden"], self.inputs["weight"], self.target,
                                    reduction=self.reduction)


class Floor(Impl):
    id, label = "floor", "floor (bare GEMMs)"
    note = "fwd: logits = h @ W.T; bwd: grad_h = G @ W, grad_W = G.T @ h (G a given [N, V])"

    def __init__(self, case, inputs, **options):
        super().__init__(case, inputs, **options)
        h = inputs["hidden"]
        self.g = None
        if case.op not in FORWARD_ONLY:
            gen = torch.Generator().manual_seed(case.seed + 2)
            # Generated in chunks so the fp32 temporary stays small in bf16 runs.
            self.g = torch.empty(case.n, case.v, dtype=h.dtype, device=h.device)
            step = max(1, (64 << 20) // (4 * case.v))
            for s in range(0, case.n, step):
                e = min(case.n, s + step)
                self.g[s:e] = torch.randn(e - s, case.v, generator=gen).to(h.device, h.dtype)

    def forward(self):
        with torch.no_grad():
            return self.inputs["hidden"] @ self.inputs["weight"].T

    def backward(self, out):
        del out
        with torch.no_grad():
            h, w = self.inputs["hidden"], self.inputs["weight"]
            return self.g @ w, self.g.T @ h

    def input_bytes(self) -> int:
        return 0 if self.g is None else self.g.numel() * self.g.element_size()


ALL_IMPLS = [Naive, Compiled, ChunkedCompiled, StarTorch, StarCpp, StarTriton,
             *STAR_KD_TYPES, LigerFLCE, LigerJSD, LigerGRPO, TorchLCE, CCE, Floor]
IMPLS = {cls.id: cls for cls in ALL_IMPLS}


def impls_for(op: str, device: str) -> list[type[Impl]]:
    """Implementations that apply to ``op``, in report order. CPU runs list the triton
    backend too (reported as not available) so nothing is silently missing."""
    del device
    return [cls for cls in ALL_IMPLS if op in cls.ops]
