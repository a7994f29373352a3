"""The C++ row ops (star_kernels._C) against plain torch computations on full logits."""

import os
import subprocess
import sys

import pytest
import torch

from star_kernels import _backends

if not _backends.cpp_available():
    pytest.skip("C++ extension star_kernels._C not built", allow_module_level=True)

from star_kernels import _cpp_rows, _torch_rows, reference  # noqa: E402
from star_kernels._config import CKDConfig  # noqa: E402

# (C, V, K, m): odd sizes around the 16-wide blocks; the last has m = V.
CKD_SHAPES = [(7, 301, 13, 17), (5, 16, 3, 1), (3, 33, 4, 33), (4, 1000, 40, 100)]


def ckd_inputs(c, v, k, dtype=torch.float64, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(c, v, generator=g, dtype=torch.float64) * 3
    if ties:  # few distinct values: many ties at the top-m threshold
        logits = logits.round()
    teacher = (torch.randn(c, v, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    lps, ids = teacher.topk(k, dim=-1)
    lps[0, k // 2:] = float("-inf")  # padding entries
    ids[0, k // 2:] = 0
    labels = torch.randint(0, v, (c,), generator=g)
    labels[::3] = -100
    scale = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return logits.to(dtype), ids, lps, labels, scale


def run_rows(mod, logits, ids, lps, labels, scale, cfg):
    z = logits.clone()
    (loss,), g = mod.ckd_rows(z, ids, lps.to(logits.dtype) if logits.dtype == torch.float64
                              else lps.float(), labels, scale, cfg=cfg)
    return loss, g, z


@pytest.mark.parametrize("shape", CKD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("knobs", [
    dict(),
    dict(tail_bucket=True, temperature=1.7),
    dict(kd_ratio=0.3, tail_coef=2.5, temperature=0.6),
    dict(kd_ratio=0.0),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
@pytest.mark.parametrize("select", [0, 1], ids=["heap", "nth"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_ckd_rows_match_torch_rows_fp64(shape, knobs, select, ties, monkeypatch):
    c, v, k, m = shape
    monkeypatch.setattr(_cpp_rows, "_SELECT_ALGO", select)
    cfg = CKDConfig(student_topm=m, **knobs)
    inputs = ckd_inputs(c, v, k, ties=ties)
    loss, g, z = run_rows(_cpp_rows, *inputs, cfg)
    exp_loss, exp_g, _ = run_rows(_torch_rows, *inputs, cfg)
    assert g is z  # written in place
    torch.testing.assert_close(loss, exp_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, exp_g, rtol=1e-12, atol=1e-13)
    # Forward only: same losses, no gradient.
    (fwd,), none = _cpp_rows.ckd_rows(inputs[0].clone(), inputs[1], inputs[2], inputs[3], None,
                                      cfg=cfg)
    assert none is None
    torch.testing.assert_close(fwd, exp_loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ckd_rows_low_precision(dtype):
    cfg = CKDConfig(student_topm=50, tail_bucket=True, kd_ratio=0.8, temperature=1.3)
    logits, ids, lps, labels, scale = ckd_inputs(6, 4099, 20)
    logits = logits.to(dtype)
    z = logits.clone()
    (loss,), g = _cpp_rows.ckd_rows(z, ids, lps.float(), labels, scale.float(), cfg=cfg)
    assert g is z and g.dtype == dtype and loss.dtype == torch.float32
    (exp_loss,), exp_g = _torch_rows.ckd_rows(logits.double(), ids, lps, labels, scale, cfg=cfg)
    torch.testing.assert_close(loss.double(), exp_loss, rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    err = (g.double() - exp_g).norm() / exp_g.norm()
    assert err < tol, err


def test_ckd_rows_deterministic_across_thread_counts():
    cfg = CKDConfig(student_topm=30, tail_bucket=True)
    logits, ids, lps, labels, scale = ckd_inputs(9, 5003, 16, dtype=torch.float32)
    lps, scale = lps.float(), scale.float()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            z = logits.clone()
            (loss,), g = _cpp_rows.ckd_rows(z, ids, lps, labels, scale, cfg=cfg)
            results.append((loss, g))
    finally:
        torch.set_num_threads(before)
    for loss, g in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(g, results[0][1])


def test_non_contiguous_chunk():
    cfg = CKDConfig(student_topm=5)
    logits, ids, lps, labels, scale = ckd_inputs(4, 130, 6)
    big = torch.zeros(4, 260, dtype=torch.float64)
    view = big[:, ::2]
    view.copy_(logits)
    (loss,), g = _cpp_rows.ckd_rows(view, ids, lps, None, scale, cfg=cfg)
    (exp_loss,), exp_g = _torch_rows.ckd_rows(logits.clone(), ids, lps, None, scale, cfg=cfg)
    assert g is view
    torch.testing.assert_close(loss, exp_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(view, exp_g, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("c,v,k", [(5, 301, 7), (3, 17, 17), (2, 1, 1), (6, 4099, 100)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.3])
def test_topk_rows_match_torch(c, v, k, temperature):
    logits = torch.randn(c, v, generator=torch.Generator().manual_seed(v), dtype=torch.float64)
    before = logits.clone()
    ids, lps = _cpp_rows.topk_rows(logits, k, temperature)
    assert torch.equal(logits, before)  # not modified
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32 and ids.shape == (c, k)
    full = torch.log_softmax(logits / temperature, dim=-1)
    exp_ids, exp_lps = reference.topk_from_logits(logits, k, temperature)
    assert torch.equal(ids, exp_ids)
    torch.testing.assert_close(lps, exp_lps.float(), rtol=1e-6, atol=1e-6)
    # In fp64 the values themselves are exact to ~1e-12 before the fp32 rounding.
    torch.testing.assert_close(full.gather(1, ids).float(), lps, rtol=0, atol=1e-6)
    assert (lps[:, 1:] <= lps[:, :-1]).all()


def test_topk_rows_ties_and_low_precision():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0] * 3], dtype=torch.float64)
    ids, lps = _cpp_rows.topk_rows(logits, 4, 1.0)
    assert ids.tolist() == [[1, 2, 4, 7]]  # ties: smaller id first
    full = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lps, full[:, [1, 2, 4, 7]].float())
    x = torch.randn(4, 1031, dtype=torch.bfloat16)
    ids, lps = _cpp_rows.topk_rows(x, 9, 1.5)
    exp = torch.log_softmax(x.float() / 1.5, -1)
    torch.testing.assert_close(lps, exp.gather(1, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lps, exp.topk(9, -1).values, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- log-probs


def torch_logprob(logits, tokens, temperature):
    """logp and entropy from plain full-logits torch (the reference)."""
    return reference.logprobs_from_logits(logits, tokens, temperature)


@pytest.mark.parametrize("c,v", [(5, 301), (3, 16), (4, 1), (7, 5003)])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.9])
@pytest.mark.parametrize("mode", ["forward", "logp_grad", "entropy_grad", "entropy_only_fwd"])
def test_logprob_rows_match_torch_fp64(c, v, temperature, mode):
    g = torch.Generator().manual_seed(c * v)
    logits = torch.randn(c, v, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, v, (c,), generator=g)
    gl = torch.randn(c, generator=g, dtype=torch.float64)
    ge = torch.randn(c, generator=g, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    exp_logp, exp_h = torch_logprob(x, tokens, temperature)

    want_entropy = mode != "logp_grad"
    grad_logp = None if mode in ("forward", "entropy_only_fwd") else gl
    grad_entropy = ge if mode == "entropy_grad" else None
    z = logits.clone()
    logp, h, dlogits = _cpp_rows.logprob_rows(z, tokens, temperature, want_entropy,
                                              grad_logp, grad_entropy)
    assert logp.dtype == torch.float64
    torch.testing.assert_close(logp, exp_logp.detach(), rtol=1e-12, atol=1e-12)
    if want_entropy:
        torch.testing.assert_close(h, exp_h.detach(), rtol=1e-12, atol=1e-12)
    else:
        assert h is None
    if grad_logp is None:
        assert dlogits is None
        return
    target = (gl * exp_logp).sum() + ((ge * exp_h).sum() if grad_entropy is not None else 0)
    (exp_d,) = torch.autograd.grad(target, x)
    assert dlogits is z
    torch.testing.assert_close(dlogits, exp_d, rtol=1e-11, atol=1e-13)


def test_logprob_rows_neg_inf_logits_and_low_precision():
    logits = torch.randn(3, 40, dtype=torch.float64)
    logits[:, 5:9] = float("-inf")  # masked-out vocabulary entries
    tokens = torch.tensor([0, 11, 39])
    gl, ge = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    exp_logp, exp_h = torch_logprob(x, tokens, 1.2)
    (exp_d,) = torch.autograd.grad((gl * exp_logp + ge * exp_h).sum(), x)
    logp, h, d = _cpp_rows.logprob_rows(logits.clone(), tokens, 1.2, True, gl, ge)
    torch.testing.assert_close(logp, exp_logp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, exp_h.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d, exp_d, rtol=1e-11, atol=1e-13)
    assert (d[:, 5:9] == 0).all()

    xb = (torch.randn(5, 3001) * 3).to(torch.bfloat16)
    tok = torch.randint(0, 3001, (5,))
    g32 = torch.randn(5)
    xf = xb.float().requires_grad_()
    lp_ref, h_ref = torch_logprob(xf, tok, 0.8)
    (d_ref,) = torch.autograd.grad((g32 * lp_ref).sum(), xf)
    z = xb.clone()
    logp, h, d = _cpp_rows.logprob_rows(z, tok, 0.8, True, g32, None)
    assert logp.dtype == torch.float32 and d is z and d.dtype == torch.bfloat16
    torch.testing.assert_close(logp, lp_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.float(), d_ref.to(torch.bfloat16).float(), rtol=2e-2, atol=1e-4)


def test_fp32_kernels_match_fp64():
    """The vectorised fp32 exp and sums stay within fp32 accuracy."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 151_936 // 8 + 5, generator=g, dtype=torch.float64) * 4
    tokens = torch.randint(0, x.shape[1], (8,), generator=g)
    logp, h, _ = _cpp_rows.logprob_rows(x.float(), tokens, 1.0, True)
    exp_logp, exp_h = torch_logprob(x, tokens, 1.0)
    torch.testing.assert_close(logp.double(), exp_logp, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(h.double(), exp_h, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_other_isa_clones(isa):
    """The baseline and AVX2 clones agree with torch too (run in a fresh process)."""
    code = (
        "import torch\n"
        "from star_kernels import _C, _cpp_rows, _torch_rows\n"
        "from star_kernels._config import CKDConfig\n"
        "import test_cpp_backend as t\n"
        "print(_C.isa())\n"
        "cfg = CKDConfig(student_topm=40, tail_bucket=True, kd_ratio=0.5, temperature=1.3)\n"
        "for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):\n"
        "    inp = t.ckd_inputs(5, 1003, 20, dtype=dtype)\n"
        "    a = t.run_rows(_cpp_rows, *inp, cfg)\n"
        "    b = t.run_rows(_torch_rows, *[x.double() if x.is_floating_point() else x\n"
        "                                  for x in inp], cfg)\n"
        "    torch.testing.assert_close(a[0].double(), b[0], rtol=tol, atol=tol)\n"
        "    torch.testing.assert_close(a[1].double(), b[1], rtol=tol, atol=tol)\n"
        "    x = inp[0]\n"
        "    ids, lps = _cpp_rows.topk_rows(x, 7, 0.9)\n"
        "    assert torch.equal(ids, (x.double() / 0.9).topk(7, -1).indices)\n"
        "    lp, h, _ = _cpp_rows.logprob_rows(x.clone(), inp[1][:, 0], 0.9, True)\n"
        "    ref = torch.log_softmax(x.double() / 0.9, -1)\n"
        "    torch.testing.assert_close(lp.double(), ref.gather(1, inp[1][:, :1])[:, 0],\n"
        "                               rtol=tol, atol=tol)\n"
    )
    here = os.path.dirname(__file__)
    env = dict(os.environ, STAR_KERNELS_CPP_ISA=isa,
               PYTHONPATH=os.pathsep.join([here, *sys.path]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] in (isa, "base")
