"""Every Triton kernel compiles to Hopper (sm_90) and Ampere (sm_80) machine code.

The interpreter runs kernels as NumPy and misses what only the compiler checks
(types across branches, loop-carried values, layouts); compiling ahead of time
with Triton's bundled ptxas catches that without a GPU. The compile runs in a
subprocess because this test session has TRITON_INTERPRET=1 set.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

COMPILE_ALL = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from star_kernels import _triton_ckd, _triton_logprobs, _triton_topk

ckd = {"logits_ptr": "*bf16", "stride_row": "i64", "ids_ptr": "*i64", "tlp_ptr": "*fp32",
       "stride_k": "i32", "labels_ptr": "*i64", "scale_ptr": "*fp32", "loss_ptr": "*fp32",
       "V": "i32", "K": "i32", "topm": "i32", "inv_t": "fp32", "lam": "fp32", "mix": "fp32",
       "ignore_index": "i32"}
topk = {"logits_ptr": "*bf16", "stride_row": "i64", "out_ids_ptr": "*i64",
        "out_lp_ptr": "*fp32", "V": "i32", "K": "i32", "inv_t": "fp32"}
logprob = {"logits_ptr": "*bf16", "stride_row": "i64", "ids_ptr": "*i64", "logp_ptr": "*fp32",
           "ent_ptr": "*fp32", "grad_logp_ptr": "*fp32", "grad_ent_ptr": "*fp32",
           "V": "i32", "inv_t": "fp32"}
cases = {
    "ckd-bf16-grad": (_triton_ckd._ckd_row_kernel, ckd, dict(
        HAS_LABELS=True, TAIL_BUCKET=True, COMPUTE_GRAD=True, LEVELS=2, RADIX_BITS=8,
        BLOCK_V=2048, BLOCK_K=128)),
    "ckd-fp32-nograd": (_triton_ckd._ckd_row_kernel, dict(ckd, logits_ptr="*fp32"), dict(
        HAS_LABELS=False, TAIL_BUCKET=False, COMPUTE_GRAD=False, LEVELS=4, RADIX_BITS=8,
        BLOCK_V=2048, BLOCK_K=128)),
    "topk-bf16": (_triton_topk._topk_kernel, topk, dict(BLOCK=2048)),
    "logprob-bf16-grad": (_triton_logprobs._logprob_kernel, logprob, dict(
        WITH_GRAD=True, WITH_GRAD_ENT=True, BLOCK=4096)),
}
results = {}
for name, (kernel, signature, constexprs) in cases.items():
    for arch in (90, 80):
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        try:
            src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
            out = triton.compile(src, target=GPUTarget("cuda", arch, 64 if arch >= 90 else 32))
            results[f"{name}-sm{arch}"] = "ok" if out.asm["cubin"] else "empty cubin"
        except Exception as exc:  # reported per case by the test
            results[f"{name}-sm{arch}"] = f"{type(exc).__name__}: {exc}"[:2000]
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-c", COMPILE_ALL], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"{name}-sm{arch}" for name in (
    "ckd-bf16-grad", "ckd-fp32-nograd", "topk-bf16", "logprob-bf16-grad") for arch in (90, 80)])
def test_kernel_compiles_for_gpu(compiled, case):
    assert compiled[case] == "ok", compiled[case]
