"""Autocast and mixed input dtypes: every op, every CPU backend, against the fp64 reference.

Under ``torch.autocast`` the fused ops run their GEMMs in the autocast dtype (fp32
tensors in, as a model under autocast hands them over); outside it, mixed dtypes
(bf16 hidden states, fp32 weight) run in the lower precision. Either way each
input's gradient comes back in its own dtype. 16-bit logits are rounded, so values
and gradients are compared by relative error with bf16-sized tolerances.
"""

import contextlib

import pytest
import torch

import star_kernels as sk
from ckd_cases import make_problem
from conftest import cpu_backends
from star_kernels import reference

BACKENDS = cpu_backends()
# (name, autocast dtype or None, hidden dtype, weight dtype, bias dtype)
MODES = [
    ("autocast-bf16", torch.bfloat16, torch.float32, torch.float32, torch.float32),
    ("autocast-fp16", torch.float16, torch.float32, torch.float32, torch.float32),
    ("mixed-bf16-hidden", None, torch.bfloat16, torch.float32, torch.float32),
    ("mixed-fp16-weight", None, torch.float32, torch.float16, torch.float32),
]
TOL = 6e-2
# CKD's confident set M is a discontinuous function of the logits: bf16 rounding moves
# ids across the m-th-largest threshold, which costs more than rounding alone.
CKD_TOL = 1e-1


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def leaves(p, mode):
    _, _, hd, wd, bd = mode
    return [p["hidden"].detach().to(hd).requires_grad_(),
            p["weight"].detach().to(wd).requires_grad_(),
            p["bias"].detach().to(bd).requires_grad_()]


def context(mode):
    return torch.autocast("cpu", dtype=mode[1]) if mode[1] else contextlib.nullcontext()


def low_dtype(mode):
    return mode[1] or min((mode[2], mode[3]), key=lambda d: torch.finfo(d).bits)


def check_grads(ours, refs, outs, exp, mode, tol=TOL):
    got = torch.autograd.grad(outs, ours)
    want = torch.autograd.grad(exp, refs)
    for name, t, g, w in zip(("hidden", "weight", "bias"), ours, got, want):
        assert g.dtype == t.dtype, f"grad of {name} is {g.dtype}, input is {t.dtype}"
        assert rel_err(g, w) < tol, (name, rel_err(g, w))


def ref_leaves(p):
    return [p[k].detach().double().requires_grad_() for k in ("hidden", "weight", "bias")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ckd(backend, mode, reduction):
    p = make_problem(29, 24, 203, 7, bias=True, pad_rows=(3,))
    ours = leaves(p, mode)
    knobs = dict(mask=p["mask"], student_topm=9, reduction=reduction, kd_ratio=0.8,
                 labels=p["labels"])
    with context(mode):
        out = sk.fused_linear_ckd_loss(*ours[:2], p["ids"], p["logprobs"].float(), bias=ours[2],
                                       backend=backend, **knobs)
    refs = ref_leaves(p)
    exp = reference.fused_linear_ckd_loss(*refs[:2], p["ids"], p["logprobs"], bias=refs[2],
                                          **knobs)
    assert out.dtype == torch.float32
    assert rel_err(out, exp) < CKD_TOL
    up = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    check_grads(ours, refs, (out * up).sum(), (exp * up.double()).sum(), mode, CKD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_logprobs(backend, mode):
    p = make_problem(31, 24, 197, 3, bias=True)
    ours = leaves(p, mode)
    ids = p["labels"].clamp_min(0)
    with context(mode):
        logp, ent = sk.fused_linear_logprobs(*ours[:2], ids, temperature=0.9,
                                             return_entropy=True, bias=ours[2], backend=backend)
    refs = ref_leaves(p)
    exp_logp, exp_ent = reference.fused_linear_logprobs(*refs[:2], ids, 0.9, True, bias=refs[2])
    assert logp.dtype == ent.dtype == torch.float32
    assert rel_err(logp, exp_logp) < TOL and rel_err(ent, exp_ent) < TOL
    check_grads(ours, refs, logp.sum() + 0.3 * ent.sum(),
                exp_logp.sum() + 0.3 * exp_ent.sum(), mode)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_grpo(backend, mode):
    p = make_problem(28, 24, 199, 3, bias=True, batch=4)
    ours = leaves(p, mode)
    g = torch.Generator().manual_seed(1)
    args = dict(token_ids=p["labels"].clamp_min(0), advantages=torch.randn(4, generator=g),
                mask=p["mask"], old_logprobs=-5 + torch.randn(4, 7, generator=g),
                ref_logprobs=-5 + torch.randn(4, 7, generator=g), kl_coef=0.1,
                kl_estimator="k3")
    with context(mode):
        loss, diag = sk.fused_linear_grpo_loss(*ours[:2], bias=ours[2], backend=backend, **args)
    refs = ref_leaves(p)
    exp, exp_diag = reference.fused_linear_grpo_loss(*refs[:2], bias=refs[2], **args)
    assert loss.dtype == torch.float32
    assert rel_err(loss, exp) < TOL
    assert rel_err(diag["logprobs"], exp_diag["logprobs"]) < TOL
    check_grads(ours, refs, loss, exp, mode)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m[0])
def test_topk(backend, mode):
    p = make_problem(19, 24, 211, 3, bias=True)
    ours = leaves(p, mode)
    with context(mode):
        ids, lps = sk.fused_linear_topk_logprobs(*ours[:2], 8, bias=ours[2], backend=backend)
    # The top-k of the logits as formed in the compute dtype, in fp64 from there on.
    low = [t.detach().to(low_dtype(mode)) for t in ours]
    full = reference.full_logprobs(*low, dtype=torch.float64)
    torch.testing.assert_close(lps.double(), full.topk(8).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.gather(1, ids), lps.double(), rtol=1e-5, atol=1e-5)
    # ... and close to the fp64 reference's top-k values.
    _, exp = reference.fused_linear_topk_logprobs(*ref_leaves(p)[:2], 8, bias=p["bias"])
    assert rel_err(lps, exp) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_gemms_in_the_autocast_dtype(dtype):
    """fp32 inputs under autocast give exactly what inputs cast by hand give."""
    p = make_problem(23, 16, 101, 5)
    h, w = p["hidden"].float(), p["weight"].float()
    with torch.autocast("cpu", dtype=dtype):
        auto = sk.fused_linear_ckd_loss(h, w, p["ids"], p["logprobs"], student_topm=6,
                                        backend="torch")
    by_hand = sk.fused_linear_ckd_loss(h.to(dtype), w.to(dtype), p["ids"], p["logprobs"],
                                       student_topm=6, backend="torch")
    fp32 = sk.fused_linear_ckd_loss(h, w, p["ids"], p["logprobs"], student_topm=6,
                                    backend="torch")
    assert auto == by_hand and auto != fp32


def test_fp64_inputs_stay_fp64_under_autocast():
    p = make_problem(11, 6, 37, 3)
    h = p["hidden"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sk.fused_linear_ckd_loss(h, p["weight"], p["ids"], p["logprobs"], student_topm=4,
                                       backend="torch")
    exp = reference.fused_linear_ckd_loss(p["hidden"], p["weight"], p["ids"], p["logprobs"],
                                          student_topm=4)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)


def test_module_forms_match_functions():
    p = make_problem(17, 8, 61, 5, bias=True)
    h, w, b = p["hidden"], p["weight"], p["bias"]
    ids = p["labels"].clamp_min(0)
    mod = sk.FusedLinearLogprobs(temperature=0.7, return_entropy=True, backend="torch")
    for a, e in zip(mod(h, w, ids, bias=b),
                    sk.fused_linear_logprobs(h, w, ids, 0.7, True, bias=b, backend="torch")):
        assert torch.equal(a, e)
    mod = sk.FusedLinearTopKLogprobs(6, temperature=1.2, backend="torch")
    for a, e in zip(mod(h, w, bias=b),
                    sk.fused_linear_topk_logprobs(h, w, 6, 1.2, bias=b, backend="torch")):
        assert torch.equal(a, e)
    adv, mask = torch.randn(17, dtype=torch.float64), p["mask"]
    mod = sk.FusedLinearGRPOLoss(clip_eps=0.1, kl_coef=0.0, loss_agg="seq_mean", backend="torch")
    loss, _ = mod(h, w, ids, adv, mask, bias=b)
    exp, _ = sk.fused_linear_grpo_loss(h, w, ids, adv, mask, clip_eps=0.1, kl_coef=0.0,
                                       loss_agg="seq_mean", bias=b, backend="torch")
    assert loss == exp
    assert "k=6" in repr(sk.FusedLinearTopKLogprobs(6)) and "kl_coef" in repr(mod)
