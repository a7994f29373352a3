"""Every Triton kernel variant the library launches compiles for sm_80, sm_86, sm_89 and
sm_90, with the signature the JIT would give it on a GPU.

The interpreter runs kernels as NumPy and misses what only the compiler checks
(types across branches, loop-carried values, layouts, register use). Without a GPU:

1. capture: a subprocess with TRITON_INTERPRET=1 runs the public ops (every dtype,
   with and without gradients, labels, tail bucket, temperature, entropy) on CPU
   tensors and records each kernel launch (arguments, constexprs, launch options);
2. compile: a subprocess without the interpreter rebuilds each launch's arguments
   (tensors of the same dtype and 16-byte alignment, the same integers) and runs the
   JIT's own binder on them, so pointer dtypes, integer widths, divisibility hints and
   value-1 specialisations are what a GPU launch would get; then compiles them
   ahead of time with Triton's bundled ptxas, 32-thread warps, and reads registers
   and stack use from the cubin with the bundled cuobjdump.

Compiles are cached by Triton (~/.triton/cache): the first run takes a few minutes.
Needs the JIT internals of triton >= 3.4 (``create_function_from_signature`` taking a
backend); older triton skips the compile step (triton 3.2 is covered by running the
interpreter tests, see benchmarks/README.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 86, 89, 90)

CAPTURE = r'''
import json, torch
import star_kernels as sk
from star_kernels import _triton_ckd, _triton_logprobs, _triton_topk

launches = {}

def describe(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."),
                "misaligned": value.data_ptr() % 16 != 0}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    raise TypeError(f"unexpected kernel argument {type(value)}")

class Recorder:
    def __init__(self, module, name):
        self.module, self.name, self.kernel = module, name, getattr(module, name)
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            rec = {"module": self.module.__name__, "kernel": self.name,
                   "args": [describe(a) for a in args],
                   "kwargs": {k: describe(v) for k, v in kwargs.items()}}
            launches[json.dumps(rec, sort_keys=True)] = rec
            return self.kernel[grid](*args, **kwargs)
        return launch

for mod, name in ((_triton_ckd, "_ckd_row_kernel"), (_triton_topk, "_topk_kernel"),
                  (_triton_logprobs, "_logprob_kernel")):
    setattr(mod, name, Recorder(mod, name))

# V = 4112 = 16 * 257: more than one 2048-wide vocabulary block and divisible by 16
# like Qwen3's 151,936; k = m = 100 as STAR's settings (BLOCK_K = 128).
g = torch.Generator().manual_seed(0)
N, H, V, K = 3, 8, 4112, 100
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    h = torch.randn(N, H, generator=g).to(dtype)
    w = torch.randn(V, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    lps = torch.randn(N, K + 1, generator=g).log_softmax(-1)[:, :K].sort(-1, True).values
    labels = torch.randint(0, V, (N,), generator=g)
    tok = torch.randint(0, V, (N,), generator=g)
    for grad in (False, True):
        for knobs in (dict(), dict(kd_ratio=0.5, tail_bucket=True, temperature=1.3),
                      dict(kd_type="rkl"), dict(kd_type="akl", kd_ratio=0.5)):
            hh, ww = h.clone().requires_grad_(grad), w.clone().requires_grad_(grad)
            loss = sk.fused_linear_ckd_loss(hh, ww, ids, lps, labels=labels, backend="triton",
                                            **knobs)
            if grad:
                loss.backward()
        hh, ww = h.clone().requires_grad_(grad), w.clone().requires_grad_(grad)
        lp, ent = sk.fused_linear_logprobs(hh, ww, tok, return_entropy=True, backend="triton")
        if grad:
            (lp.sum() + ent.sum()).backward()
            hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            sk.fused_linear_logprobs(hh, ww, tok, backend="triton").sum().backward()
            hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            loss, _ = sk.fused_linear_grpo_loss(hh, ww, tok, torch.randn(N, generator=g),
                                                torch.ones(N, dtype=torch.bool),
                                                backend="triton")
            loss.backward()
    sk.fused_linear_topk_logprobs(h, w, K, backend="triton")
print(json.dumps(list(launches.values())))
'''

COMPILE = r'''
import json, os, subprocess, sys, tempfile, warnings
from concurrent.futures import ProcessPoolExecutor
warnings.filterwarnings("ignore")

def compile_one(job):
    launch, arch = job
    import importlib
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])

    def value(d):
        if "tensor" in d:
            buf = torch.empty(64, dtype=getattr(torch, d["tensor"]))
            return buf[1:] if d["misaligned"] else buf  # CPU allocations are 64-aligned
        return next(iter(d.values()))

    args = [value(a) for a in launch["args"]]
    kwargs = {k: value(v) for k, v in launch["kwargs"].items()}
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options)
    try:
        out = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                             options=options.__dict__)
    except Exception as exc:  # reported per launch by the test
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(out.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True,
                               text=True).stdout.split()
    fields = dict(x.split(":", 1) for x in usage if x.split(":", 1)[0] in ("REG", "STACK"))
    sig = {k: v for k, v in signature.items() if v != "constexpr"}
    return {"signature": sig, "constexprs": {str(k): v for k, v in constexprs.items()},
            "num_warps": options.num_warps, "regs": int(fields.get("REG", -1)),
            "stack": int(fields.get("STACK", -1))}

if __name__ == "__main__":
    launches = json.loads(sys.stdin.read())
    try:
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
        import inspect
        assert "backend" in inspect.signature(create_function_from_signature).parameters
    except (ImportError, AssertionError):
        print(json.dumps({"skip": "this triton's JIT has no create_function_from_signature"
                                  "(sig, params, backend)"}))
        sys.exit(0)
    jobs = [(launch, arch) for launch in launches for arch in ARCHS]
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(compile_one, jobs))
    out = {}
    for (launch, arch), res in zip(jobs, results):
        out.setdefault(f"{launch['kernel']}#{launches.index(launch)}", {})[f"sm{arch}"] = res
    print(json.dumps(out))
'''.replace("ARCHS", repr(ARCHS))


def _run(script, stdin="", interpret=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, input=stdin,
                         capture_output=True, text=True, timeout=1500, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def launches():
    return json.loads(_run(CAPTURE, interpret=True))


@pytest.fixture(scope="module")
def compiled(launches):
    out = json.loads(_run(COMPILE, json.dumps(launches)))
    if "skip" in out:
        pytest.skip(out["skip"])
    return out


def test_capture_sees_every_kernel_variant(launches):
    kernels = {}
    for launch in launches:
        kernels.setdefault(launch["kernel"], []).append(launch)
    assert set(kernels) == {"_ckd_row_kernel", "_topk_kernel", "_logprob_kernel"}
    # CKD: 3 dtypes x grad/no grad x (plain, labels + tail bucket, rkl, akl + labels);
    # 16-bit keys for 2.
    ckd = kernels["_ckd_row_kernel"]
    assert len(ckd) == 24
    assert {c["kwargs"]["KD_TYPE"]["int"] for c in ckd} == {0, 1, 2}
    assert {c["kwargs"]["KEY16"]["bool"] for c in ckd} == {True, False}
    assert {c["kwargs"]["COMPUTE_GRAD"]["bool"] for c in ckd} == {True, False}
    assert len(kernels["_topk_kernel"]) == 3


def test_every_launch_compiles_for_every_arch(compiled):
    failures = {f"{name} {arch}": res["error"] for name, per_arch in compiled.items()
                for arch, res in per_arch.items() if "error" in res}
    assert not failures, failures
    for per_arch in compiled.values():
        assert set(per_arch) == {f"sm{a}" for a in ARCHS}


def warps_per_sm(regs, num_warps):
    """Resident warps per SM on sm_80..sm_90 for this register count: 64K registers,
    allocated per warp in units of 256 (8 per thread), at most 64 warps (48 on sm_86
    and sm_89, which the CKD and top-k kernels do not reach)."""
    per_warp = -(-regs // 8) * 8 * 32
    return min(64, (65536 // (per_warp * num_warps)) * num_warps)


def test_row_kernels_occupancy(compiled, launches):
    """Issue 11 item 7: on sm_90 the CKD and top-k row kernels keep 32 warps per SM
    resident (top-k at 4 warps had 12) and at most an 8-byte stack frame (one variant,
    fp32 CKD with labels and no gradient, keeps 8 bytes)."""
    for name, per_arch in compiled.items():
        if not name.startswith(("_ckd_row_kernel", "_topk_kernel")):
            continue
        res = per_arch["sm90"]
        assert warps_per_sm(res["regs"], res["num_warps"]) >= 32, (name, res)
        assert res["stack"] <= 8, (name, res)
