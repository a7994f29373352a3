"""Benchmark rows for the newer top-k distillation peers (issue 11), kept apart from
``ops.py`` and registered into its table by :func:`register`.

- ``veomni_topk``: VeOmni's ``chunk_topk_distill_function`` (veomni >= 0.1.12):
  chunked torch, forward KL on the teacher's top-k only (it also returns log-probs
  and entropy of the labels); runs on CPU.
- ``liger_kldiv``: Liger-Kernel's ``LigerFusedLinearKLDivLoss`` (liger-kernel >= 0.8.5):
  KL to a *dense* ``[N, V]`` target distribution (here the teacher's top-k
  probabilities scattered into zeros, an input, not timed); Triton, CUDA only.
- ``star_{torch,cpp,triton}_fkl``: our CKD op with ``tail_coef=0``, i.e. the same
  forward KL on the teacher's top-k: the rows to compare these peers with.

``python -m benchmarks.peers`` is the isolated worker (``benchmarks.measure``'s) with
these rows registered.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

from . import ops

_VEOMNI_MODULE = "veomni.ops.kernels.cross_entropy.chunk_topk_distill"


def _load_veomni():
    """VeOmni's ``chunk_topk_distill_function``. ``import veomni`` pulls in its whole
    training framework (and fails with transformers versions it does not pin); the
    function itself needs only torch, its sibling ``chunk_logprobs`` and
    ``get_parallel_state().sp_enabled``. When the package import fails, the two files
    are loaded from the installed package with sequence parallelism stubbed off."""
    try:
        return importlib.import_module(_VEOMNI_MODULE).chunk_topk_distill_function
    except ImportError:
        pass
    spec = importlib.util.find_spec("veomni")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("veomni is not installed")
    for name in [m for m in sys.modules if m == "veomni" or m.startswith("veomni.")]:
        del sys.modules[name]  # half-imported by the failed attempt
    root = Path(next(iter(spec.submodule_search_locations)))
    state = types.SimpleNamespace(sp_enabled=False)
    stubs = {"veomni": root, "veomni.ops": root / "ops", "veomni.ops.kernels":
             root / "ops" / "kernels", "veomni.ops.kernels.cross_entropy":
             root / "ops" / "kernels" / "cross_entropy", "veomni.distributed": None}
    for name, path in stubs.items():
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)] if path else []
        sys.modules[name] = mod
    parallel = types.ModuleType("veomni.distributed.parallel_state")
    parallel.get_parallel_state = lambda: state
    sys.modules[parallel.__name__] = parallel
    return importlib.import_module(_VEOMNI_MODULE).chunk_topk_distill_function


class VeOmniTopkDistill(ops.Impl):
    id, label = "veomni_topk", "VeOmni chunk_topk_distill"
    ops = ("ckd",)
    note = ("veomni's chunk_topk_distill_function: forward KL on the teacher's top-k "
            "only (+ log-probs, entropy), chunked torch, chunk_size 1024 (its default), "
            "mean over tokens; compare with the star *_fkl rows")

    @classmethod
    def unavailable(cls, case):
        if not ops._installed("veomni"):
            return "not installed: veomni"
        try:
            _load_veomni()
        except Exception as exc:  # noqa: BLE001 - reported as the row's status
            return f"not available: veomni's chunk_topk_distill_function: {exc}"[:300]
        return None

    def __init__(self, case, inputs, **options):
        super().__init__(case, inputs, **options)
        self.fn = _load_veomni()
        # Labels only feed its log-prob output; already aligned, so no causal shift.
        self.labels = inputs["teacher_ids"][:, 0].contiguous()

    def forward(self):
        i = self.inputs
        out = self.fn(i["hidden"], i["weight"], self.labels, i["teacher_ids"],
                      i["teacher_logprobs"], shift_labels=self.labels)
        return out[2].mean()


class LigerKLDiv(ops.Impl):
    id, label = "liger_kldiv", "Liger fused linear KL div"
    ops = ("ckd",)
    note = ("LigerFusedLinearKLDivLoss(reduction='batchmean'): KL to a dense [N, V] target "
            "(the teacher's top-k probabilities scattered into zeros); Triton, CUDA only")

    @classmethod
    def unavailable(cls, case):
        if not ops._installed("liger_kernel"):
            return "not installed: liger-kernel"
        try:
            from liger_kernel.transformers import LigerFusedLinearKLDivLoss  # noqa: F401
        except ImportError:
            from importlib.metadata import version
            return (f"not available: liger-kernel {version('liger-kernel')} has no "
                    "LigerFusedLinearKLDivLoss (added in 0.8.5)")
        return ops._needs_cuda(case, "liger-kernel's fused linear KL div")

    def __init__(self, case, inputs, **options):
        super().__init__(case, inputs, **options)
        from liger_kernel.transformers import LigerFusedLinearKLDivLoss
        self.loss = LigerFusedLinearKLDivLoss(reduction="batchmean")
        h, ids = inputs["hidden"], inputs["teacher_ids"]
        self.target = torch.zeros(case.n, case.v, dtype=h.dtype, device=h.device)
        self.target.scatter_(1, ids, inputs["teacher_logprobs"].exp().to(h.dtype))

    def forward(self):
        return self.loss(self.inputs["hidden"], self.inputs["weight"], self.target)


class _StarFKL(ops.Star):
    note = "star_kernels CKD op with tail_coef=0: forward KL on the teacher's top-k only"

    def forward(self):
        import star_kernels as sk
        i = self.inputs
        return sk.fused_linear_ckd_loss(i["hidden"], i["weight"], i["teacher_ids"],
                                        i["teacher_logprobs"], tail_coef=0.0,
                                        student_topm=self.case.k, backend=self.backend)


def _fkl(backend):
    return type(f"StarFKL_{backend}", (_StarFKL,), {
        "id": f"star_{backend}_fkl", "label": f"star_kernels [{backend}] FKL only",
        "backend": backend, "ops": ("ckd",)})


PEERS = [_fkl("torch"), _fkl("cpp"), _fkl("triton"), VeOmniTopkDistill, LigerKLDiv]


def register() -> None:
    """Add the peer rows to ``ops.ALL_IMPLS`` / ``ops.IMPLS`` (idempotent, by id)."""
    for cls in PEERS:
        if cls.id not in ops.IMPLS:
            ops.ALL_IMPLS.append(cls)
            ops.IMPLS[cls.id] = cls


register()

if __name__ == "__main__":
    from .measure import _worker
    raise SystemExit(_worker())
