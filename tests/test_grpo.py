"""fused_linear_grpo_loss against the fp64 full-logits reference (star_kernels.reference)."""

import pytest
import torch

import star_kernels as sk
from conftest import cpu_backends
from star_kernels import reference

BACKENDS = cpu_backends()
ESTIMATORS = ["k1", "k2", "k3"]
AGGS = ["token_mean", "seq_mean", "dr_grpo"]


def problem(b=4, t=7, h=9, v=101, dtype=torch.float64, seed=0, bias=True):
    """A padded batch: sequence 2 is empty, padding positions hold a bogus id (-100)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 2
    bias_ = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    ids = torch.randint(0, v, (b, t), generator=g)
    lengths = torch.tensor([t, 3, 0, 5][:b])
    mask = torch.arange(t)[None] < lengths[:, None]
    mask[0, 0] = False                                    # a masked prompt token
    ids[~mask] = -100
    with torch.no_grad():
        logp = reference_logp(hidden, weight, bias_, ids.clamp_min(0), 1.0)
    # Old policy within and outside the clip range; reference further away.
    old = torch.where(mask, logp + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64), 0.0)
    ref = torch.where(mask, logp + 0.8 * torch.randn(b, t, generator=g, dtype=torch.float64), 0.0)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    def cast(x):
        return None if x is None else x.to(dtype)
    return dict(hidden=cast(hidden), weight=cast(weight), bias=cast(bias_), token_ids=ids,
                mask=mask, old_logprobs=old, ref_logprobs=ref, advantages=adv)


def reference_logp(hidden, weight, bias, ids, temperature):
    return reference.fused_linear_logprobs(hidden, weight, ids, temperature, bias=bias)


def reference_loss(hidden, weight, bias, **args):
    return reference.fused_linear_grpo_loss(hidden, weight, bias=bias, **args)[0]


def run_both(backend, p, **knobs):
    leaves = [p["hidden"], p["weight"]] + ([p["bias"]] if p["bias"] is not None else [])
    ours = [t.detach().clone().requires_grad_() for t in leaves]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    rest = {k: p[k] for k in ("token_ids", "advantages", "mask", "old_logprobs", "ref_logprobs")}
    rest.update(knobs)
    loss, diag = sk.fused_linear_grpo_loss(ours[0], ours[1],
                                           bias=ours[2] if len(ours) > 2 else None,
                                           backend=backend, **rest)
    exp = reference_loss(refs[0], refs[1], refs[2] if len(refs) > 2 else None, **rest)
    got_g = torch.autograd.grad(loss, ours)
    exp_g = torch.autograd.grad(exp, refs)
    return loss, exp, got_g, exp_g, diag


def assert_close(loss, exp, got_g, exp_g, tol):
    torch.testing.assert_close(loss.double(), exp, rtol=tol, atol=tol)
    for name, a, b in zip(("hidden", "weight", "bias"), got_g, exp_g):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=f"grad of {name}")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("agg", AGGS)
def test_estimators_and_aggregations_match_reference(estimator, agg):
    p = problem()
    res = run_both("torch", p, kl_estimator=estimator, loss_agg=agg, kl_coef=0.3,
                   temperature=0.8)
    assert_close(*res[:4], tol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("knobs", [
    dict(),
    dict(old_logprobs=None, ref_logprobs=None),
    dict(old_logprobs=None, kl_estimator="k3", loss_agg="seq_mean", kl_coef=0.5),
    dict(kl_coef=0.0, loss_agg="dr_grpo", clip_eps=0.1),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "defaults")
def test_backends_match_reference(backend, knobs):
    p = problem(v=211)
    p.update({k: v for k, v in knobs.items() if k in p})
    res = run_both(backend, p, **{k: v for k, v in knobs.items() if k not in p})
    assert_close(*res[:4], tol=1e-9 if backend != "triton" else 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kl_clamp", [10.0, 0.5, None])
def test_kl_clamp_matches_reference(backend, estimator, kl_clamp):
    """The estimator's value is clamped per token (released: [-10, 10]), no gradient there."""
    p = problem(v=151, seed=4)
    g = torch.Generator().manual_seed(9)
    logp = p["ref_logprobs"]
    far = 12.0 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    p["ref_logprobs"] = torch.where(p["mask"], logp + far, 0.0)
    res = run_both(backend, p, kl_estimator=estimator, kl_coef=0.7, kl_clamp=kl_clamp)
    tol = 1e-9 if backend != "triton" else 2e-5
    assert_close(*res[:4], tol=tol)
    with torch.no_grad():
        lp = reference_logp(p["hidden"], p["weight"], p["bias"], p["token_ids"].clamp_min(0), 1.0)
        raw = reference.kl_estimate(lp, p["ref_logprobs"], estimator)[p["mask"]]
        bound = float("inf") if kl_clamp is None else kl_clamp
        assert (raw.abs() > bound).any() or kl_clamp is None  # the clamp is exercised
        exp_kl = raw.clamp(-bound, bound).mean()
    torch.testing.assert_close(res[4]["mean_kl"].double(), exp_kl, rtol=tol, atol=tol)


def test_kl_clamp_default_is_released_value():
    p = problem(seed=4)
    p["ref_logprobs"] = torch.where(p["mask"], p["ref_logprobs"] + 9.0, 0.0)
    p["backend"] = "torch"
    default, _ = sk.fused_linear_grpo_loss(**p)
    ten, _ = sk.fused_linear_grpo_loss(**p, kl_clamp=10.0)
    off, _ = sk.fused_linear_grpo_loss(**p, kl_clamp=None)
    assert default == ten and off > ten
    mod = sk.FusedLinearGRPOLoss(backend="torch", kl_clamp=None)
    q = {k: v for k, v in p.items() if k != "backend"}
    assert mod(q.pop("hidden"), q.pop("weight"), **q)[0] == off


def test_per_token_advantages_and_flat_rows():
    p = problem()
    per_token = p["advantages"][:, None].expand(4, 7).clone()
    per_token[~p["mask"]] = float("nan")                  # ignored where masked out
    a = run_both("torch", {**p, "advantages": per_token})
    b = run_both("torch", p)
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    # [N, H] rows are one sequence with per-token advantages.
    flat = {k: (v.reshape(-1, *v.shape[2:]) if k not in ("weight", "bias") and v is not None
                else v) for k, v in p.items() if k != "advantages"}
    flat["advantages"] = p["advantages"][:, None].expand(4, 7).reshape(-1)
    loss, _ = sk.fused_linear_grpo_loss(backend="torch", **flat)
    torch.testing.assert_close(loss, b[0].detach(), rtol=1e-12, atol=1e-12)


def test_diagnostics():
    p = problem()
    loss, exp, _, _, diag = run_both("torch", p, clip_eps=(0.1, 0.3), kl_estimator="k3")
    m = p["mask"]
    with torch.no_grad():
        logp = reference_logp(p["hidden"], p["weight"], p["bias"], p["token_ids"].clamp_min(0), 1)
    ratio = (logp - p["old_logprobs"]).exp()[m]
    adv = p["advantages"][:, None].expand(4, 7)[m]
    clipped = ((ratio < 0.9) & (adv < 0)) | ((ratio > 1.3) & (adv > 0))
    d = p["ref_logprobs"][m] - logp[m]
    assert 0 < diag["clip_fraction"] < 1
    torch.testing.assert_close(diag["clip_fraction"], clipped.double().mean())
    torch.testing.assert_close(diag["mean_ratio"], ratio.mean())
    torch.testing.assert_close(diag["mean_kl"], (d.exp() - d - 1).mean())
    assert not any(v.requires_grad for v in diag.values())
    assert diag["logprobs"].shape == p["token_ids"].shape
    torch.testing.assert_close(diag["logprobs"][m], logp[m])
    assert (diag["logprobs"][~m] == 0).all()
    _, exp_diag = reference.fused_linear_grpo_loss(**p, clip_eps=(0.1, 0.3), kl_estimator="k3")
    for key, value in exp_diag.items():
        torch.testing.assert_close(diag[key], value, msg=key)


def test_on_policy_loss_is_minus_mean_advantage():
    p = problem()
    loss, diag = sk.fused_linear_grpo_loss(
        p["hidden"], p["weight"], p["token_ids"], p["advantages"], p["mask"], bias=p["bias"],
        backend="torch")
    adv = p["advantages"][:, None].expand(4, 7)[p["mask"]]
    torch.testing.assert_close(loss, -adv.mean())
    assert diag["clip_fraction"] == 0 and diag["mean_kl"] == 0 and diag["mean_ratio"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_all_false_mask_gives_zero_loss_and_grads(backend, agg):
    p = problem()
    p["mask"] = torch.zeros_like(p["mask"])
    p["token_ids"] = torch.full_like(p["token_ids"], -100)
    loss, exp, got_g, _, diag = run_both(backend, p, loss_agg=agg)
    assert loss == 0 and all((g == 0).all() for g in got_g)
    assert all(torch.isfinite(v).all() for v in diag.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 5e-2)])
def test_low_precision_inputs(backend, dtype, tol):
    p = problem(h=32, v=257, dtype=dtype)
    loss, exp, got_g, exp_g, _ = run_both(backend, p, kl_coef=0.1)
    assert loss.dtype == torch.float32 and got_g[0].dtype == dtype
    torch.testing.assert_close(loss.double(), exp, rtol=tol, atol=tol)
    for a, b in zip(got_g, exp_g):
        assert (a.double() - b).norm() / b.norm() < tol


@pytest.mark.parametrize("over,match", [
    (lambda p: dict(advantages=p["advantages"].clone().fill_(float("nan"))),
     "advantages holds NaN"),
    (lambda p: dict(advantages=p["advantages"].clone().fill_(float("inf"))),
     "advantages holds inf"),
    (lambda p: dict(advantages=p["advantages"][:3]), "advantages must have shape"),
    (lambda p: dict(advantages=torch.zeros(4, 3, dtype=torch.float64)),
     "advantages must have shape"),
    (lambda p: dict(advantages=torch.zeros(4, dtype=torch.long)), "advantages must have dtype"),
    (lambda p: dict(old_logprobs=torch.full((4, 7), float("nan"))), "old_logprobs holds NaN"),
    (lambda p: dict(ref_logprobs=torch.full((4, 7), float("nan"))), "ref_logprobs holds NaN"),
    (lambda p: dict(ref_logprobs=torch.zeros(4, 6)), "ref_logprobs must have shape"),
    (lambda p: dict(token_ids=p["token_ids"].clamp_min(0) + 101), "token_ids holds id"),
    (lambda p: dict(token_ids=p["token_ids"][:, :6]), "token_ids must have shape"),
    (lambda p: dict(mask=p["mask"][:3]), "mask must have shape"),
    (lambda p: dict(mask=p["mask"].double()), "mask must have dtype"),
    (lambda p: dict(kl_estimator="k4"), "kl_estimator must be one of"),
    (lambda p: dict(loss_agg="mean"), "loss_agg must be one of"),
    (lambda p: dict(clip_eps=-0.1), "clip_eps"),
    (lambda p: dict(clip_eps=(0.1, 0.2, 0.3)), "clip_eps"),
    (lambda p: dict(kl_coef=-1.0), "kl_coef"),
    (lambda p: dict(temperature=0), "temperature"),
    (lambda p: dict(kl_clamp=0.0), "kl_clamp"),
    (lambda p: dict(kl_clamp=float("inf")), "kl_clamp"),
    (lambda p: dict(weight=p["weight"].half(), hidden=p["hidden"].bfloat16()),
     "float16 and bfloat16 have no common lower precision"),
    (lambda p: dict(validate="none"), "validate must be one of"),
    (lambda p: dict(backend="tpu"), "backend must be one of"),
])
def test_bad_input_names_the_argument(over, match):
    p = problem()
    p["backend"] = "torch"
    p.update(over(p))
    with pytest.raises((ValueError, TypeError), match=match):
        sk.fused_linear_grpo_loss(**p)
