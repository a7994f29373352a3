"""fused_linear_logprobs (log-prob of given ids, entropy, gradients) against fp64 references."""

import pytest
import torch

import star_kernels as sk
from conftest import cpu_backends
from star_kernels import reference

BACKENDS = cpu_backends()
SHAPES = [(37, 19, 301), (23, 8, 97), (5, 3, 7)]


def problem(n, h, v, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 2
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    ids = torch.randint(0, v, (n,), generator=g)
    def cast(t):
        return None if t is None else t.to(dtype)
    return cast(hidden), cast(weight), cast(b), ids


def ref_outputs(hidden, weight, bias, ids, temperature):
    return reference.fused_linear_logprobs(hidden, weight, ids, temperature, return_entropy=True,
                                           bias=bias)


def both(backend, hidden, weight, bias, ids, temperature=1.0, entropy=True, seed=1, **kw):
    """Outputs and gradients (of a random combination of both outputs) from op and reference."""
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    ours = [t.detach().clone().requires_grad_() for t in leaves]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    b = ours[2] if bias is not None else None
    out = sk.fused_linear_logprobs(ours[0], ours[1], ids, temperature=temperature,
                                   return_entropy=entropy, bias=b, backend=backend, **kw)
    out = out if entropy else (out,)
    exp = ref_outputs(refs[0], refs[1], refs[2] if bias is not None else None, ids, temperature)
    exp = exp if entropy else exp[:1]
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out]
    got_g = torch.autograd.grad([o for o in out], ours, [u.to(o.dtype) for u, o in zip(ups, out)])
    exp_g = torch.autograd.grad(list(exp), refs, ups)
    return out, exp, got_g, exp_g


def assert_close(out, exp, got_g, exp_g, tol):
    for a, b in zip(out, exp):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
    for name, a, b in zip(("hidden", "weight", "bias"), got_g, exp_g):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=f"grad of {name}")


def tol_for(backend):
    return 1e-9 if backend != "triton" else 2e-5  # triton computes rows in fp32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_and_entropy_match_reference(backend, shape, temperature):
    p = problem(*shape)
    res = both(backend, *p, temperature=temperature)
    assert res[0][0].dtype == torch.float64 and res[0][0].shape == (shape[0],)
    assert_close(*res, tol_for(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_logprobs_only_batched(backend, bias):
    hidden, weight, b, ids = problem(24, 10, 131, bias=bias)
    res = both(backend, hidden.reshape(4, 6, 10), weight, b, ids.reshape(4, 6), entropy=False,
               temperature=1.3)
    assert res[0][0].shape == (4, 6)
    assert_close(*res, tol_for(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_entropy_only(backend):
    hidden, weight, bias, ids = problem(11, 6, 53)
    h = hidden.clone().requires_grad_()
    _, ent = sk.fused_linear_logprobs(h, weight, ids, return_entropy=True, bias=bias,
                                      backend=backend)
    (g,) = torch.autograd.grad(ent.sum(), h)
    hr = hidden.clone().requires_grad_()
    (exp,) = torch.autograd.grad(ref_outputs(hr, weight, bias, ids, 1.0)[1].sum(), hr)
    torch.testing.assert_close(g, exp, rtol=tol_for(backend), atol=tol_for(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_minus_inf_bias_on_padded_vocabulary(backend, temperature):
    """Padded vocabulary rows carry a -inf bias: finite entropy and gradients, as the reference."""
    hidden, weight, bias, ids = problem(21, 9, 113, seed=3)
    pad = torch.zeros(113, dtype=torch.bool)
    pad[100:] = True
    pad[[7, 50]] = True
    bias = torch.where(pad, float("-inf"), bias)
    ids = torch.where(pad[ids], 0, ids)
    out, exp, got_g, exp_g = both(backend, hidden, weight, bias, ids, temperature=temperature)
    for t in (*out, *got_g):
        assert torch.isfinite(t).all()
    assert (got_g[2][pad] == 0).all()
    assert_close(out, exp, got_g, exp_g, tol_for(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_low_precision_inputs(backend, dtype, tol):
    p = problem(40, 32, 257, dtype=dtype)
    out, exp, got_g, exp_g = both(backend, *p, temperature=0.9)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert got_g[0].dtype == dtype and got_g[1].dtype == dtype
    for a, b in zip(out, exp):
        # bf16 rounds the logits themselves: compare by relative norm.
        assert (a.double() - b).norm() / b.norm() < tol
    for a, b in zip(got_g, exp_g):
        assert (a.double() - b).norm() / b.norm() < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_does_not_change_result(backend):
    p = problem(50, 16, 301)
    one = both(backend, *p)
    many = both(backend, *p, memory_budget=7 * 301 * 8)
    for a, b in zip(one[0] + one[2], many[0] + many[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_fp64(backend):
    if backend == "cpp" and not sk._backends.cpp_available():
        pytest.skip("C++ extension not built")
    hidden, weight, bias, ids = problem(5, 4, 13)
    args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]

    def f(h, w, b):
        return sk.fused_linear_logprobs(h, w, ids, temperature=1.3, return_entropy=True,
                                        bias=b, backend=backend)
    assert torch.autograd.gradcheck(f, args)


def test_empty_input():
    hidden, weight, _, _ = problem(4, 3, 9)
    h = hidden[:0].clone().requires_grad_()
    lp = sk.fused_linear_logprobs(h, weight, torch.zeros(0, dtype=torch.long), backend="torch")
    assert lp.shape == (0,)
    lp.sum().backward()
    assert h.grad.shape == (0, 3)


@pytest.mark.parametrize("over,match", [
    (lambda p: dict(token_ids=torch.full((6,), 19)), "token_ids holds id 19"),
    (lambda p: dict(token_ids=torch.full((6,), -1)), "outside the vocabulary"),
    (lambda p: dict(token_ids=torch.zeros(5, dtype=torch.long)), "token_ids must have shape"),
    (lambda p: dict(token_ids=torch.zeros(6)), "token_ids must have dtype"),
    (lambda p: dict(hidden=p["hidden"].half(), weight=p["weight"].bfloat16()),
     "float16 and bfloat16 have no common lower precision"),
    (lambda p: dict(validate="never"), "validate must be one of"),
    (lambda p: dict(weight=p["weight"][:, :2]), "hidden size"),
    (lambda p: dict(bias=torch.zeros(3, dtype=torch.float64)), "bias must be"),
    (lambda p: dict(temperature=-1.0), "temperature"),
    (lambda p: dict(backend="jax"), "backend must be one of"),
])
def test_bad_input_names_the_argument(over, match):
    hidden, weight, _, ids = problem(6, 4, 19)
    p = dict(hidden=hidden, weight=weight, token_ids=ids, backend="torch")
    p.update(over(p))
    with pytest.raises((ValueError, TypeError), match=match):
        sk.fused_linear_logprobs(**p)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_triton_logprobs_on_cuda_at_qwen_vocab(dtype, tol):
    p = [t.cuda() for t in problem(67, 64, 151936, dtype=dtype)]
    out, exp, got_g, exp_g = both("triton", *p)
    for a, b in zip(list(out) + list(got_g), list(exp) + list(exp_g)):
        assert (a.double() - b).norm() / b.norm() < tol
