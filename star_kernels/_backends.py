"""What runs: which implementation of the row ops, and in which dtype the GEMMs run."""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "torch", "cpp")


_warned_no_cpp = False


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not installed, not built, wrong device)."""


def _triton_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    # Triton's interpreter runs kernels on CPU tensors (how CI tests them).
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def cpp_available() -> bool:
    try:
        importlib.import_module("star_kernels._C")
    except ImportError:
        return False
    return True


def _warn_no_cpp_once():
    global _warned_no_cpp
    if not _warned_no_cpp:
        _warned_no_cpp = True
        warnings.warn("star_kernels: the C++ CPU backend (star_kernels._C) is not built; "
                      "backend='auto' uses the slower chunked torch backend on CPU "
                      "(reinstall with a C++ compiler and ninja to build it)", stacklevel=3)


def resolve(backend: str, device: torch.device) -> str:
    """Map ``backend`` (possibly ``"auto"``) to a concrete backend for ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu":
            if cpp_available():
                return "cpp"
            _warn_no_cpp_once()
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise BackendUnavailableError(
                "backend 'triton' is unavailable: the triton package is not installed")
        if not _triton_runs_on(device):
            raise BackendUnavailableError(
                f"backend 'triton' is unavailable for {device.type} tensors: it needs CUDA "
                "tensors (or TRITON_INTERPRET=1 for CPU tensors, slow, for testing)")
    if backend == "cpp":
        if device.type != "cpu":
            raise BackendUnavailableError(
                f"backend 'cpp' is unavailable for {device.type} tensors: it runs on CPU only")
        if not cpp_available():
            raise BackendUnavailableError(
                "backend 'cpp' is unavailable: the C++ extension star_kernels._C was not "
                "built (reinstall with a C++ compiler and ninja present)")
    return backend


_TRITON_MODULES = {"ckd": "_triton_ckd", "topk": "_triton_topk", "logprob": "_triton_logprobs"}


def row_functions(backend: str, op: str):
    """``(op_rows, op_workspace_bytes)`` of a concrete backend; ``op`` is ckd, topk or logprob.

    Row functions follow the contracts of ``_torch_rows``; the workspace function
    gives the bytes per logit a chunk needs, which sizes chunks to the budget.
    """
    module = {"torch": "_torch_rows", "cpp": "_cpp_rows"}.get(backend) or _TRITON_MODULES[op]
    mod = importlib.import_module(f"star_kernels.{module}")
    return getattr(mod, f"{op}_rows"), getattr(mod, f"{op}_workspace_bytes")


def default_memory_budget(device: torch.device) -> int:
    """Bytes of chunk workspace when the caller does not set ``memory_budget``.

    512 MiB on CUDA keeps chunks large enough for full-speed GEMMs (about 1,700
    rows at V=151,936 in bf16) while the transient total, with the per-chunk
    ``[V, H]`` weight-gradient product, stays under 1 GB at H=1024.
    """
    return (512 << 20) if device.type == "cuda" else (256 << 20)


# ---------------------------------------------------------------------------
# Compute dtype: autocast and mixed input dtypes.


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        pass
    return None


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.dtype:
    """The dtype a fused op runs its GEMMs in.

    Under an active ``torch.autocast`` on the inputs' device: the autocast dtype
    (float64 inputs stay float64, as autocast leaves them). Otherwise the inputs'
    common dtype, or for mixed dtypes (bf16 hidden states from an autocast trunk
    and an fp32 weight) the lowest-precision one. The casts happen inside the
    op's autograd Function, so each input's gradient comes back in its own dtype.
    """
    dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
    autocast = _autocast_dtype(hidden.device.type)
    if autocast is not None and dtypes != {torch.float64}:
        return autocast
    if len(dtypes) == 1:
        return dtypes.pop()
    if {torch.float16, torch.bfloat16} <= dtypes:
        names = ", ".join(f"{n} {t.dtype}" for n, t in
                          (("hidden", hidden), ("weight", weight), ("bias", bias))
                          if t is not None)
        raise TypeError(f"{names}: float16 and bfloat16 have no common lower precision; "
                        "cast them to one dtype")
    return min(dtypes, key=lambda d: torch.finfo(d).bits)


def host_sync_forbidden(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host must be avoided right now: while a
    CUDA graph is captured (it would fail) or ``torch.compile`` traces (a graph break)."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def no_autocast(device: torch.device):
    """Autocast off for the op's own GEMMs: they run in the dtype chosen up front,
    writing into buffers of that dtype (autocast would recast them)."""
    if _autocast_dtype(device.type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
