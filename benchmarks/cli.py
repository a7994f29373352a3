"""``python -m benchmarks OP [OP ...] [options]``: run the suite, write JSON, markdown, PNGs.

See ``benchmarks/README.md`` for the presets and what each implementation is.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from . import ops, peers  # noqa: F401 - peers registers its rows into ops

REPO = Path(__file__).resolve().parent.parent

QWEN3_STUDENT_H = (1024, 2048, 2560)  # Qwen3-0.6B, 1.7B, 4B
QWEN3_TEACHER_H = 4096                # Qwen3-8B
QWEN3_V = 151_936

# preset -> dict(shapes: op -> [(n, h)], v, k, dtype)
PRESETS = {
    "smoke": dict(v=1000, k=16, dtype="float32",
                  shapes={op: [(64, 32), (96, 32)] for op in ops.OPS}),
    # The CPU reference shape.
    "quick": dict(v=QWEN3_V, k=100, dtype="float32",
                  shapes={op: [(2048, 256)] for op in ops.OPS}),
    # Reduced GPU set for gpu_check.sh (Qwen3-0.6B head; the target N = 8192).
    "gpu-check": dict(v=QWEN3_V, k=100, dtype="bfloat16",
                      shapes={"ckd": [(2048, 1024), (8192, 1024)],
                              "topk": [(8192, QWEN3_TEACHER_H)],
                              "logprobs": [(8192, 1024)], "grpo": [(8192, 1024)]}),
    # Everything: student heads for the training ops, the teacher head for top-k.
    "full": dict(v=QWEN3_V, k=100, dtype="bfloat16", shapes={
        **{op: [(n, h) for h in QWEN3_STUDENT_H for n in (1024, 2048, 4096, 8192, 16384, 32768)]
           for op in ("ckd", "logprobs", "grpo")},
        "topk": [(n, QWEN3_TEACHER_H) for n in (1024, 2048, 4096, 8192, 16384, 32768)]}),
}


def _csv(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time forward/backward and measure peak memory of star_kernels' fused "
                    "lm_head ops against naive, torch.compile, other libraries and the "
                    "bare-GEMM floor.")
    p.add_argument("ops", nargs="+", choices=[*ops.OPS, "all"], metavar="OP",
                   help="ckd, topk, logprobs, grpo or all")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="shape set (default: quick on CPU, gpu-check on CUDA)")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="= --preset quick: the CPU reference shape N=2048, H=256, V=151,936, fp32")
    p.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                   help="= --preset smoke: tiny shapes, seconds")
    p.add_argument("--n", type=int, nargs="+", help="token counts (overrides the preset)")
    p.add_argument("--h", type=int, nargs="+", help="hidden sizes (overrides the preset)")
    p.add_argument("--v", type=int, help="vocabulary size")
    p.add_argument("--k", type=int, help="teacher top-k = student top-m")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--impls", type=_csv, help=f"only these, comma-separated: {','.join(ops.IMPLS)}")
    p.add_argument("--skip", type=_csv, default=[], help="leave these out (reported as skipped)")
    p.add_argument("--modes", type=_csv, help="subset of fwd,bwd,fwdbwd")
    p.add_argument("--repeats", type=int, default=3, help="CPU: timed runs per mode (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="CPU: untimed runs first (default 1)")
    p.add_argument("--warmup-ms", type=int, default=25, help="GPU: do_bench warm-up window")
    p.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench measuring window")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="a fresh process per implementation and shape (CPU default)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false",
                     help="run in this process (GPU default; CPU peak RSS then less exact)")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds per isolated implementation run (default 1800)")
    p.add_argument("--time-budget", type=float,
                   help="seconds for the whole run; what is left is reported as skipped")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    p.add_argument("--chunk-rows", type=int, help="rows per chunk of the chunked variant")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"),
                   help="output folder (default benchmarks/out)")
    p.add_argument("--name", help="file stem (default: bench-<date>)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


# ---------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": run("rev-parse", "HEAD"),
                "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def environment(device: str) -> dict:
    import torch

    import star_kernels
    from star_kernels import _backends
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "device": device,
        "device_name": (torch.cuda.get_device_name(torch.device(device))
                        if device.startswith("cuda") else _cpu_model()),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "star_kernels": star_kernels.__version__,
        "star_kernels_cpp_built": _backends.cpp_available(),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "git": _git(),
    }
    if device.startswith("cuda"):
        env["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30, 1)
    return env


# ---------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------

def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


FULL_LOGITS = {"naive", "compiled", "floor"}


def _too_big(impl_id: str, case: ops.Case) -> str | None:
    """CPU only: skip a full-logits run that cannot fit, instead of invoking the OOM killer."""
    if case.device != "cpu" or impl_id not in FULL_LOGITS:
        return None
    avail = _mem_available()
    need = case.n * case.v * 4 * (2 if impl_id == "floor" else 6)  # rough copies of logits
    if avail and need > 0.9 * avail:
        return (f"OOM: predicted, ~{need / 2**30:.1f} GiB of [N, V] buffers, "
                f"{avail / 2**30:.1f} GiB available (not run)")
    return None


def _run_isolated(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    try:
        # benchmarks.peers = benchmarks.measure's worker with the peer rows registered
        proc = subprocess.run([sys.executable, "-m", "benchmarks.peers"],
                              input=json.dumps(spec), capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "message": f"timeout: more than {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    if proc.returncode in (-9, 137):
        return {"status": "OOM", "message": "OOM: process killed by SIGKILL (likely the OOM killer)"}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return {"status": "error",
            "message": f"error: worker exited with {proc.returncode}: {tail[0][:300]}"}


def run_suite(args, progress=None) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    preset_name = args.preset or ("gpu-check" if cuda else "quick")
    preset = PRESETS[preset_name]
    op_list = list(ops.OPS) if "all" in args.ops else list(dict.fromkeys(args.ops))
    v, k = args.v or preset["v"], args.k or preset["k"]
    dtype = args.dtype or preset["dtype"]
    isolate = (not cuda) if args.isolate is None else args.isolate
    start = time.monotonic()
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    env = environment(device)
    config = {"preset": preset_name, "ops": op_list, "v": v, "k": k, "dtype": dtype,
              "isolate": isolate, "repeats": args.repeats, "warmup": args.warmup,
              "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
              "memory": not args.no_memory, "chunk_rows": args.chunk_rows,
              "impls": args.impls, "skip": args.skip}
    records = []
    data = {"schema": 1, "env": env, "config": config, "records": records, "complete": False}
    for op in op_list:
        shapes = preset["shapes"][op]
        if args.n or args.h:
            ns = args.n or sorted({n for n, _ in shapes})
            hs = args.h or sorted({h for _, h in shapes})
            shapes = [(n, h) for h in hs for n in ns]
        for n, h in shapes:
            case = ops.Case(op=op, n=n, h=h, v=v, k=min(k, v), dtype=dtype, device=device)
            for cls in ops.impls_for(op, device):
                if args.impls and cls.id not in args.impls:
                    continue
                label = f"{op} N={n} H={h} {cls.id}"
                base = {"impl": cls.id, "label": cls.label, "note": cls.note,
                        **case.to_dict(), "time_ms": {}, "mem_bytes": {}, "errors": {}}
                if cls.id in args.skip:
                    records.append({**base, "status": "skipped", "message": "skipped: --skip"})
                    continue
                if args.time_budget and time.monotonic() - start > args.time_budget:
                    records.append({**base, "status": "skipped",
                                    "message": f"skipped: time budget {args.time_budget:.0f} s spent"})
                    log(f"[skip] {label}: time budget")
                    continue
                too_big = _too_big(cls.id, case)
                if too_big:
                    records.append({**base, "status": "OOM", "message": too_big})
                    log(f"[OOM ] {label}: {too_big}")
                    continue
                spec = dict(impl=cls.id, modes=args.modes, warmup=args.warmup,
                            repeats=args.repeats, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                            memory=not args.no_memory, chunk_rows=args.chunk_rows)
                t0 = time.monotonic()
                if isolate:
                    rec = _run_isolated({**spec, "case": case.to_dict(),
                                         "threads": args.threads}, args.timeout)
                    rec = {**base, **rec}
                else:
                    from .measure import measure
                    if args.threads:
                        torch.set_num_threads(args.threads)
                    rec = measure(spec.pop("impl"), case, **spec)
                rec["wall_s"] = round(time.monotonic() - t0, 2)
                records.append(rec)
                log(f"[{rec['status'][:4]:4}] {label}: {_short(rec)} ({rec['wall_s']} s)")
                if progress:
                    add_ratios(data)
                    progress(data)
    data["complete"] = True
    add_ratios(data)
    return data


def _short(rec: dict) -> str:
    if rec["status"] != "ok":
        return rec.get("message", "")
    parts = [f"{m}={t['median']:.1f}ms" for m, t in rec.get("time_ms", {}).items()]
    parts += [f"mem[{m}]={b / 2**20:.0f}MiB" for m, b in rec.get("mem_bytes", {}).items()]
    parts += [f"{m}: {e}" for m, e in rec.get("errors", {}).items()]
    return " ".join(parts)


def add_ratios(data: dict) -> None:
    """Per record: time and memory as ratios to naive and time to the floor, same mode."""
    groups: dict = {}
    for rec in data["records"]:
        groups.setdefault((rec["op"], rec["n"], rec["h"], rec["v"], rec["dtype"]), {})[rec["impl"]] = rec
    for group in groups.values():
        naive, floor = group.get("naive"), group.get("floor")
        for rec in group.values():
            rec["ratios"] = {}
            for mode, t in rec.get("time_ms", {}).items():
                r = {}
                for name, ref in (("naive", naive), ("floor", floor)):
                    ref_t = ref and ref.get("time_ms", {}).get(mode)
                    if ref_t and ref_t["median"] > 0:
                        r[f"time_vs_{name}"] = t["median"] / ref_t["median"]
                ref_m = naive and naive.get("mem_bytes", {}).get(mode)
                mem = rec.get("mem_bytes", {}).get(mode)
                if ref_m and mem is not None:
                    r["mem_vs_naive"] = mem / ref_m
                rec["ratios"][mode] = r


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import report
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or "bench-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    def progress(data):  # the JSON so far, so a killed run still leaves its results
        (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")

    data = run_suite(args, progress)
    paths = report.write_outputs(data, out, name, plots=not args.no_plots)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
