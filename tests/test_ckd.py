"""fused_linear_ckd_loss on every CPU backend against the fp64 full-logits reference."""

import pytest
import torch

import star_kernels as sk
from ckd_cases import make_problem
from conftest import cpu_backends
from star_kernels import reference

BACKENDS = cpu_backends()
# (N, H, V, K, m): odd sizes; the last has K = m = V.
SHAPES = [(37, 19, 301, 13, 17), (23, 8, 97, 5, 1), (9, 6, 11, 11, 11)]


def run_both(backend, p, grad_out=None, upcast=True, **knobs):
    """Loss and gradients from ``backend`` and from the fp64 reference on the same inputs."""
    leaves = [p["hidden"], p["weight"]] + ([p["bias"]] if p["bias"] is not None else [])
    ours = [t.detach().clone().requires_grad_() for t in leaves]
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    budget = knobs.pop("memory_budget", None)
    common = dict(mask=p.get("mask"), labels=p["labels"], **knobs)
    out = sk.fused_linear_ckd_loss(ours[0], ours[1], p["ids"], p["logprobs"],
                                   bias=ours[2] if len(ours) > 2 else None,
                                   backend=backend, memory_budget=budget, **common)
    exp = reference.fused_linear_ckd_loss(ref_in[0], ref_in[1], p["ids"], p["logprobs"].double(),
                                          bias=ref_in[2] if len(ref_in) > 2 else None, **common)
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=torch.float64) if out.dim() else torch.tensor(1.7)
    got_g = torch.autograd.grad(out, ours, grad_out.to(out.dtype))
    exp_g = torch.autograd.grad(exp, ref_in, grad_out.double())
    return out, exp, got_g, exp_g


def assert_close(out, exp, got_g, exp_g, rtol, atol):
    torch.testing.assert_close(out.double(), exp, rtol=rtol, atol=atol)
    for name, a, b in zip(("hidden", "weight", "bias"), got_g, exp_g):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_fp64(backend, shape, reduction):
    n, h, v, k, m = shape
    p = make_problem(n, h, v, k, bias=True, pad_rows=(1, 4))
    res = run_both(backend, p, student_topm=m, reduction=reduction)
    tol = 1e-9 if backend != "triton" else 1e-5  # triton computes rows in fp32
    assert_close(*res, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("knobs", [
    dict(tail_bucket=True),
    dict(kd_ratio=0.3, temperature=1.7),
    dict(kd_ratio=0.0),
    dict(tail_coef=0.0, student_topm=5),
    dict(tail_coef=3.5, tail_bucket=True, kd_ratio=0.6, temperature=0.6),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_knobs_match_reference(backend, knobs):
    p = make_problem(31, 12, 211, 9, pad_rows=(2,), bias=True)
    res = run_both(backend, p, reduction="mean", **{"student_topm": 13, **knobs})
    tol = 1e-9 if backend != "triton" else 1e-5
    assert_close(*res, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_tokens_and_per_token_upstream_grad(backend):
    p = make_problem(24, 10, 129, 6, batch=3)
    res = run_both(backend, p, student_topm=7, reduction="none")
    assert res[0].shape == (3, 8)
    assert (res[0][~p["mask"]] == 0).all()
    tol = 1e-9 if backend != "triton" else 1e-5
    assert_close(*res, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 6e-2)])
def test_low_precision_inputs(backend, dtype, tol):
    p = make_problem(40, 32, 257, 10, dtype=dtype, bias=True)
    p["logprobs"] = p["logprobs"].float()
    out, exp, got_g, exp_g = run_both(backend, p, student_topm=11, reduction="mean")
    assert out.dtype == torch.float32
    assert got_g[0].dtype == dtype and got_g[1].dtype == dtype
    torch.testing.assert_close(out.double(), exp, rtol=tol, atol=tol)
    for a, b in zip(got_g, exp_g):
        # bf16 rounds the logits themselves: compare gradients by relative norm.
        err = (a.double() - b).norm() / b.norm()
        assert err < tol, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_does_not_change_result(backend):
    p = make_problem(50, 16, 301, 8, bias=True)
    one = run_both(backend, p, student_topm=9)
    many = run_both(backend, p, student_topm=9, memory_budget=7 * 301 * 32)
    torch.testing.assert_close(one[0], many[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(one[2], many[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_false_mask_gives_zero_loss_and_grads(backend, reduction):
    p = make_problem(12, 8, 53, 4, bias=True)
    h = p["hidden"].clone().requires_grad_()
    w = p["weight"].clone().requires_grad_()
    out = sk.fused_linear_ckd_loss(h, w, p["ids"], p["logprobs"], mask=torch.zeros(12, dtype=bool),
                                   student_topm=5, reduction=reduction, backend=backend)
    assert torch.isfinite(out).all() and (out == 0).all()
    out.sum().backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


def test_loss_is_positive_with_tail_bucket_where_truncated_fkl_is_not():
    # The student puts more mass than the teacher on the teacher's ids.
    v, k = 50, 3
    weight = torch.eye(v, dtype=torch.float64)[:, :v]
    hidden = torch.zeros(1, v, dtype=torch.float64)
    hidden[0, :k] = 8.0
    ids = torch.arange(k)[None]
    logprobs = torch.full((1, k), 0.2, dtype=torch.float64).log()
    plain = sk.fused_linear_ckd_loss(hidden, weight, ids, logprobs, tail_coef=0.0,
                                     student_topm=k, backend="torch")
    bucket = sk.fused_linear_ckd_loss(hidden, weight, ids, logprobs, tail_coef=0.0,
                                      student_topm=k, backend="torch", tail_bucket=True)
    assert plain < 0 < bucket


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_fp64(backend):
    if backend == "cpp" and not sk._backends.cpp_available():
        pytest.skip("C++ extension not built")
    p = make_problem(5, 4, 13, 3, bias=True, pad_rows=(1,))
    h, w, b = (p[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))

    def f(h, w, b):
        return sk.fused_linear_ckd_loss(h, w, p["ids"], p["logprobs"], mask=p["mask"], bias=b,
                                        student_topm=4, kd_ratio=0.7, labels=p["labels"],
                                        tail_bucket=True, temperature=1.3, reduction="none",
                                        backend=backend)

    assert torch.autograd.gradcheck(f, (h, w, b))


def test_module_matches_function():
    p = make_problem(17, 8, 61, 5)
    mod = sk.FusedLinearCKDLoss(student_topm=6, tail_coef=2.0, backend="torch")
    fn = sk.fused_linear_ckd_loss(p["hidden"], p["weight"], p["ids"], p["logprobs"],
                                  mask=p["mask"], student_topm=6, tail_coef=2.0, backend="torch")
    assert mod(p["hidden"], p["weight"], p["ids"], p["logprobs"], mask=p["mask"]) == fn
    assert "student_topm=6" in repr(mod)
