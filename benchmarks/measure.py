"""Timing and peak memory of one implementation on one case.

GPU: ``triton.testing.do_bench`` (median and quartiles over as many runs as fit its
``rep`` window after a ``warmup`` window; it flushes the L2 cache before every run), or
CUDA events when triton is missing. Peak memory from ``torch.cuda.max_memory_allocated``.

CPU: ``warmup`` untimed runs, then ``repeats`` timed runs (median, min, quartiles).
Peak memory is the process's peak RSS: the high-water mark is reset through
``/proc/self/clear_refs`` right before the measured run, after inputs exist and after
warm-up (so torch.compile's compilation is not counted); with no way to reset it the
peak is read from ``ru_maxrss`` and marked as such. For honest numbers each
implementation runs in its own fresh process (``python -m benchmarks.measure``, spec
as JSON on stdin, result as JSON on stdout's last line).

Memory is reported as *transient*: peak minus what was allocated before the run
(inputs, previous outputs) minus the gradients the run leaves in ``.grad``.

Run modes: ``fwd`` (forward with autograd recording), ``bwd`` (backward of a fresh
forward done outside the timer before every run), ``fwdbwd`` (both).
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time
import traceback

import torch

from . import ops


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch.cuda, "OutOfMemoryError", MemoryError))):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(status, message) for an exception raised by an implementation."""
    if _is_oom(exc):
        return "OOM", str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "OOM"
    text = str(exc).strip().splitlines()
    return "error", f"{type(exc).__name__}: {text[0][:300] if text else ''}"


# ---------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CpuPeak:
    """Peak RSS growth over a block (bytes)."""

    def __enter__(self):
        gc.collect()
        self.reset = _reset_hwm()
        if self.reset:
            self.base = _status_kb("VmRSS") * 1024
            self.method = "VmHWM after reset (clear_refs) minus VmRSS before"
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss growth (includes earlier peaks)"
        return self

    def __exit__(self, *exc):
        if self.reset:
            self.peak = _status_kb("VmHWM") * 1024
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.bytes = max(0, self.peak - self.base)
        return False


class CudaPeak:
    method = "torch.cuda.max_memory_allocated minus memory_allocated before"

    def __enter__(self):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()
        self.bytes = max(0, self.peak - self.base)
        return False


# ---------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------

def _summary(times_ms: list[float], method: str) -> dict:
    times = sorted(times_ms)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {"median": statistics.median(times), "min": times[0], "q25": q[0], "q75": q[2],
            "runs": len(times), "method": method}


def time_cpu(fn, warmup: int, repeats: int, before=None) -> dict:
    for _ in range(warmup):
        if before:
            before()
        fn()
    times = []
    for _ in range(max(1, repeats)):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times, f"wall clock, {warmup} warm-up + {max(1, repeats)} runs")


def time_cuda(fn, warmup_ms: int, rep_ms: int, grad_to_none=None, before=None) -> dict:
    if before is None:
        try:
            from triton.testing import do_bench
            q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                         quantiles=[0.0, 0.25, 0.5, 0.75])
            return {"median": q[2], "min": q[0], "q25": q[1], "q75": q[3], "runs": None,
                    "method": f"triton.testing.do_bench(warmup={warmup_ms}ms, rep={rep_ms}ms), "
                              "L2 flushed per run"}
        except ImportError:
            pass
    # CUDA events (also used when each run needs an untimed set-up step).
    for _ in range(2):  # the first run warms up, the second estimates the run time
        if before:
            before()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
    est = max(1e-3, (time.perf_counter() - t0) * 1e3)
    n_warm, n_rep = max(1, int(warmup_ms / est)), max(3, int(rep_ms / est))
    for _ in range(n_warm):
        if before:
            before()
        fn()
    times = []
    for _ in range(n_rep):
        if before:
            before()
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return _summary(times, f"CUDA events, {n_warm} warm-up + {n_rep} runs")


# ---------------------------------------------------------------------------------
# one implementation on one case
# ---------------------------------------------------------------------------------

def _grad_bytes(tensors) -> int:
    return sum(t.grad.numel() * t.grad.element_size() for t in tensors if t.grad is not None)


def measure(impl_id: str, case: ops.Case, *, modes=None, warmup: int = 1, repeats: int = 3,
            warmup_ms: int = 25, rep_ms: int = 100, memory: bool = True,
            chunk_rows: int | None = None) -> dict:
    """Time and measure one implementation; never raises for the implementation's errors."""
    cls = ops.IMPLS[impl_id]
    rec = {"impl": impl_id, "label": cls.label, "note": cls.note, **case.to_dict(),
           "status": "ok", "message": "", "time_ms": {}, "mem_bytes": {}, "errors": {}}
    reason = cls.unavailable(case)
    if reason:
        rec["status"], rec["message"] = reason.split(":", 1)[0], reason
        return rec
    modes = [m for m in (modes or ops.modes_for(case.op)) if m in ops.modes_for(case.op)]
    cuda = case.device.startswith("cuda")
    torch.manual_seed(case.seed)
    try:
        inputs = ops.make_inputs(case)
        impl = cls(case, inputs, chunk_rows=chunk_rows)
    except Exception as exc:  # noqa: BLE001 - reported, never dropped
        rec["status"], rec["message"] = describe_error(exc)
        return rec
    leaves = ops.leaves(inputs)
    grad_ctx = torch.no_grad if case.op in ops.FORWARD_ONLY else torch.enable_grad

    def clear_grads():
        for t in leaves:
            t.grad = None

    def fwd():
        with grad_ctx():
            return impl.forward()

    def fwdbwd():
        impl.backward(fwd())

    for mode in modes:
        held = {}
        try:
            if mode == "bwd":
                def setup():
                    clear_grads()
                    held["out"] = fwd()

                def fn():  # each run gets its own forward: compiled graphs free
                    impl.backward(held["out"])  # (donate) their buffers in backward
            else:
                setup = clear_grads
                fn = fwd if mode == "fwd" else fwdbwd
            if cuda:
                timing = (time_cuda(fn, warmup_ms, rep_ms, before=setup) if mode == "bwd"
                          else time_cuda(fn, warmup_ms, rep_ms, grad_to_none=leaves))
            else:
                timing = time_cpu(fn, warmup, repeats, before=setup)
            rec["time_ms"][mode] = timing
            if memory and mode != "bwd":
                setup()
                held.clear()
                with (CudaPeak() if cuda else CpuPeak()) as peak:
                    out = fn()
                rec["mem_bytes"][mode] = max(0, peak.bytes - _grad_bytes(leaves))
                rec["mem_method"] = peak.method
                del out
        except Exception as exc:  # noqa: BLE001
            status, msg = describe_error(exc)
            rec["errors"][mode] = f"{status}: {msg}" if status == "OOM" else msg
            if status == "OOM" and cuda:
                held.clear()
                gc.collect()
                torch.cuda.empty_cache()
        finally:
            held.clear()
            clear_grads()
    if rec["errors"] and not rec["time_ms"]:
        first = next(iter(rec["errors"].values()))
        rec["status"] = "OOM" if first.startswith("OOM") else "error"
        rec["message"] = first
    if cuda:
        del impl, inputs, leaves
        gc.collect()
        torch.cuda.empty_cache()
    return rec


def _worker() -> int:
    """Subprocess entry: read a spec on stdin, print the record as the last stdout line."""
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec.pop("threads", None) or torch.get_num_threads())
    case = ops.Case(**spec.pop("case"))
    try:
        rec = measure(spec.pop("impl"), case, **spec)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        status, msg = describe_error(exc)
        rec = {"status": status, "message": msg}
    rec["rss_after_import_kb"] = _status_kb("VmRSS")
    sys.stdout.write("\n" + json.dumps(rec) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker())
