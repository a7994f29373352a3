"""The hot path of a loss call: host synchronisations, value checks, gradient accumulation.

A host synchronisation is what reading a tensor's value from Python costs on CUDA
(``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``). CPU tensors cannot show the
stall, so these tests count the Python-level reads instead: the ops must make none
on their hot path (``validate="shapes"``, or ``"auto"`` after the first call on
CUDA) and exactly one (all value checks together) with full validation.
"""

import contextlib
import math

import pytest
import torch

import star_kernels as sk
from ckd_cases import make_problem
from conftest import cpu_backends
from star_kernels import _chunked, _torch_rows, _validation, reference

BACKENDS = cpu_backends()
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def count_syncs(monkeypatch):
    """Counts Python-level reads of tensor values (per kind) while active. The CPU tensors
    stand in for accelerator ones: the torch backend takes the path it takes there (it
    reads on the host only where that is free, ``_torch_rows.host_reads_are_free``)."""
    monkeypatch.setattr(_torch_rows, "host_reads_are_free", lambda t: False)
    counts = {}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    original_nonzero = torch.nonzero

    def nonzero(*args, **kwargs):
        counts["nonzero"] = counts.get("nonzero", 0) + 1
        return original_nonzero(*args, **kwargs)
    monkeypatch.setattr(torch, "nonzero", nonzero)
    yield counts
    monkeypatch.undo()


def ckd_call(p, h, w, **kw):
    args = dict(teacher_ids=p["ids"], teacher_logprobs=p["logprobs"], student_topm=5)
    return sk.fused_linear_ckd_loss(h, w, **{**args, **kw})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ckd_forward_backward_without_a_sync(backend, reduction, monkeypatch):
    p = make_problem(21, 8, 67, 4, bias=True)
    h, w = (p[k].clone().requires_grad_() for k in ("hidden", "weight"))
    with count_syncs(monkeypatch) as counts:
        out = ckd_call(p, h, w, bias=p["bias"], backend=backend, reduction=reduction,
                       validate="shapes")
        out.backward(torch.ones_like(out))
    assert counts == {}
    exp = reference.fused_linear_ckd_loss(p["hidden"], p["weight"], p["ids"], p["logprobs"],
                                          bias=p["bias"], student_topm=5, reduction=reduction)
    torch.testing.assert_close(out.double(), exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_and_topk_without_a_sync(backend, monkeypatch):
    p = make_problem(21, 8, 67, 4, bias=True)
    h = p["hidden"].clone().requires_grad_()
    ids = p["labels"].clamp_min(0)
    with count_syncs(monkeypatch) as counts:
        logp, ent = sk.fused_linear_logprobs(h, p["weight"], ids, return_entropy=True,
                                             backend=backend, validate="shapes")
        (logp.sum() + ent.sum()).backward()
        sk.fused_linear_topk_logprobs(p["hidden"], p["weight"], 5, backend=backend)
    assert counts == {}


def test_a_mask_costs_one_sync_and_full_validation_one_more(monkeypatch):
    """Before: bool(keep.all()), nonzero and one read per value check (about seven)."""
    p = make_problem(21, 8, 67, 4, bias=True)
    labels = p["labels"]
    h = p["hidden"].clone().requires_grad_()
    with count_syncs(monkeypatch) as counts:
        ckd_call(p, h, p["weight"], mask=p["mask"], kd_ratio=0.5, labels=labels,
                 backend="torch", validate="full").backward()
    assert counts == {"nonzero": 1, "tolist": 1}
    g = torch.Generator().manual_seed(0)
    with count_syncs(monkeypatch) as counts:
        loss, _ = sk.fused_linear_grpo_loss(
            h, p["weight"], labels.clamp_min(0), torch.randn(21, generator=g), p["mask"],
            old_logprobs=-torch.rand(21, generator=g), ref_logprobs=-torch.rand(21, generator=g),
            loss_agg="seq_mean", backend="torch", validate="shapes")
        loss.backward()
    assert counts == {"nonzero": 1}


def test_auto_validation_checks_values_on_the_first_call_only_off_cpu(monkeypatch):
    monkeypatch.setattr(_validation, "_validated_ops", set())
    meta, cpu = torch.device("meta"), torch.device("cpu")
    assert _validation.value_checks("auto", "ckd", cpu) is not None
    first = _validation.value_checks("auto", "ckd", meta)
    assert first is not None
    again = _validation.value_checks("auto", "ckd", meta)
    assert again is not None, "a check that has not run yet does not count"
    first.run()
    assert _validation.value_checks("auto", "ckd", meta) is None
    assert _validation.value_checks("auto", "grpo", meta) is not None
    assert _validation.value_checks("full", "ckd", meta) is not None
    assert _validation.value_checks("auto", "ckd", cpu) is not None
    assert _validation.value_checks("shapes", "ckd", cpu) is None


def test_shapes_only_skips_value_checks_but_not_structure():
    p = make_problem(6, 4, 19, 3)
    logits = p["logprobs"] + 5.0
    with pytest.raises(ValueError, match="teacher_logprobs holds"):
        ckd_call(p, p["hidden"], p["weight"], teacher_logprobs=logits, backend="torch")
    ckd_call(p, p["hidden"], p["weight"], teacher_logprobs=logits, backend="torch",
             validate="shapes")
    with pytest.raises(ValueError, match="teacher_ids must have shape"):
        ckd_call(p, p["hidden"], p["weight"], teacher_ids=p["ids"][:5], backend="torch",
                 validate="shapes")


# ----------------------------------------------------------------------------- teacher


def test_teacher_log_probs_from_a_16_bit_cache_are_accepted():
    p = make_problem(13, 6, 41, 41)            # K = V: all the probability mass
    for dtype in (torch.bfloat16, torch.float16):
        lps = p["logprobs"].to(dtype)
        assert torch.logsumexp(lps.double(), 1).max() > 0  # rounding put mass above 1
        loss = ckd_call(p, p["hidden"], p["weight"], teacher_logprobs=lps, backend="torch")
        assert torch.isfinite(loss)


def test_teacher_mass_just_over_the_tolerance_is_rejected():
    p = make_problem(5, 4, 23, 4)
    lps = torch.full((5, 4), math.log((1 + 2 * _validation.TEACHER_MASS_TOLERANCE) / 4),
                     dtype=torch.float64)
    with pytest.raises(ValueError, match="add up to 1.02 > 1"):
        ckd_call(p, p["hidden"], p["weight"], teacher_logprobs=lps, backend="torch")


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["cpu", "blocked"])
def test_weight_grad_accumulates_in_fp32(dtype, path, monkeypatch):
    """16-bit chunk products go into the fp32 accumulator without a 16-bit [V, H] partial:
    the result is the exact product of the 16-bit values to fp32 accuracy."""
    g = torch.Generator().manual_seed(0)
    d = torch.randn(37, 203, generator=g).to(dtype)
    h = torch.randn(37, 19, generator=g).to(dtype)
    acc = torch.randn(203, 19, generator=g)
    exp = acc.double() + d.double().T @ h.double()
    if path == "blocked":
        monkeypatch.setattr(_chunked, "_PARTIAL_ROWS", 50)
        _chunked._accumulate_blocked(acc, d, h)
        tol = 1e-2  # a 16-bit partial per block: rounded once, like the GEMM's output
    else:
        _chunked.accumulate_weight_grad(acc, d, h)
        tol = 1e-6
    assert ((acc.double() - exp).norm() / exp.norm()) < tol


def test_finish_grad_scales_and_casts_in_one_pass():
    g = torch.randn(7, 5)
    out = _chunked.finish_grad(g.clone(), torch.bfloat16, torch.tensor(0.5))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (g * 0.5).bfloat16(), rtol=0, atol=0)
    same = g.clone()
    assert _chunked.finish_grad(same, torch.float32, torch.tensor(2.0)) is same  # in place
    assert _chunked.finish_grad(None, torch.float32, torch.tensor(2.0)) is None


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ckd_mask_without_row_selection_where_syncs_are_forbidden(backend, reduction,
                                                                   monkeypatch):
    """Under CUDA graph capture / torch.compile tracing masked rows run weighted 0."""
    monkeypatch.setattr(sk._backends, "host_sync_forbidden", lambda device: True)
    p = make_problem(24, 8, 67, 4, bias=True, batch=3)
    h, w = (p[k].clone().requires_grad_() for k in ("hidden", "weight"))
    knobs = dict(mask=p["mask"], student_topm=5, reduction=reduction, kd_ratio=0.6,
                 labels=p["labels"])
    with count_syncs(monkeypatch) as counts:
        out = sk.fused_linear_ckd_loss(h, w, p["ids"], p["logprobs"], backend=backend,
                                       validate="shapes", **knobs)
        up = torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
        got = torch.autograd.grad(out, (h, w), up)
    assert counts == {}
    hr, wr = (p[k].clone().requires_grad_() for k in ("hidden", "weight"))
    exp = reference.fused_linear_ckd_loss(hr, wr, p["ids"], p["logprobs"], **knobs)
    want = torch.autograd.grad(exp, (hr, wr), up)
    tol = 1e-9 if backend != "triton" else 1e-5
    torch.testing.assert_close(out, exp, rtol=tol, atol=tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "dr_grpo"])
def test_grpo_mask_without_row_selection_where_syncs_are_forbidden(backend, agg, monkeypatch):
    p = make_problem(28, 8, 67, 3, bias=True, batch=4)
    g = torch.Generator().manual_seed(2)
    mask = p["mask"].clone()
    mask[2] = False                                       # an empty sequence
    adv = torch.randn(4, 7, generator=g, dtype=torch.float64)
    adv[~mask] = float("nan")                             # ignored where masked out
    ids = torch.where(mask, p["labels"].clamp_min(0), -100)
    # Far from the policy where masked out: k3's exp(ref - logp) would overflow there.
    ref = torch.where(mask, -3 + torch.randn(4, 7, generator=g, dtype=torch.float64), 1e4)
    args = dict(token_ids=ids, advantages=adv, mask=mask, ref_logprobs=ref,
                old_logprobs=-3 + torch.randn(4, 7, generator=g, dtype=torch.float64),
                kl_coef=0.2, kl_estimator="k3", loss_agg=agg)
    hr = p["hidden"].clone().requires_grad_()
    args_ref = {**args, "advantages": torch.where(mask, adv, 0.0),
                "ref_logprobs": torch.where(mask, ref, 0.0)}
    exp, exp_diag = reference.fused_linear_grpo_loss(hr, p["weight"], bias=p["bias"], **args_ref)
    (want,) = torch.autograd.grad(exp, hr)
    for forbidden in (False, True):
        monkeypatch.setattr(sk._backends, "host_sync_forbidden", lambda device: forbidden)
        h = p["hidden"].clone().requires_grad_()
        with count_syncs(monkeypatch) as counts:
            loss, diag = sk.fused_linear_grpo_loss(h, p["weight"], bias=p["bias"],
                                                   backend=backend, validate="shapes", **args)
            (got,) = torch.autograd.grad(loss, h)
        assert counts == ({} if forbidden else {"nonzero": 1})
        tol = 1e-9 if backend != "triton" else 1e-5
        torch.testing.assert_close(loss, exp, rtol=tol, atol=tol)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        for key, value in exp_diag.items():
            torch.testing.assert_close(diag[key], value, rtol=tol, atol=tol, msg=key)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_hot_path_has_no_sync_and_fp32_weight_grad():
    """On a GPU: after the first (validating) call, a CKD step under bf16 autocast runs
    with CUDA's sync debug mode set to error; the fp32 weight's gradient is fp32."""
    p = make_problem(67, 64, 4099, 20, dtype=torch.float32)
    p = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    h, w = (p[k].clone().requires_grad_() for k in ("hidden", "weight"))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sk.fused_linear_ckd_loss(h, w, p["ids"], p["logprobs"].float(),
                                            student_topm=20, backend="triton")
        loss.backward()
        return loss

    step()  # validates once, probes the fp32-output GEMM once
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    hr, wr = (p[k].double().requires_grad_() for k in ("hidden", "weight"))
    exp = reference.fused_linear_ckd_loss(hr, wr, p["ids"], p["logprobs"], student_topm=20)
    exp.backward()
    assert abs(loss.item() - exp.item()) / abs(exp.item()) < 6e-2
    assert ((w.grad.double() - wr.grad).norm() / wr.grad.norm()).item() < 6e-2
