"""fused_linear_topk_logprobs (exact and sampled) against fp64 full-logits references."""

import pytest
import torch

import star_kernels as sk
from conftest import cpu_backends
from star_kernels import reference

BACKENDS = cpu_backends()
# (N, H, V, k): odd sizes; k = V and k = 1 included.
SHAPES = [(37, 19, 301, 13), (23, 8, 97, 97), (9, 6, 11, 1), (6, 5, 1031, 40)]


def problem(n, h, v, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 3
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    def cast(t):
        return None if t is None else t.to(dtype)
    return cast(hidden), cast(weight), cast(b)


def ref_logprobs(hidden, weight, bias, temperature):
    """fp64 full log-softmax of the logits as the fused op forms them (same dtype GEMM)."""
    return reference.full_logprobs(hidden, weight, bias, temperature, dtype=torch.float64)


def check_topk(ids, lps, ref, k, atol):
    """Values equal the reference top-k; ids are distinct and carry those values (ties free)."""
    ids, lps = ids.reshape(-1, k), lps.reshape(-1, k)
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32
    exp_vals = ref.topk(k, dim=1).values
    torch.testing.assert_close(lps.double(), exp_vals, rtol=2e-6, atol=atol)
    torch.testing.assert_close(ref.gather(1, ids), exp_vals, rtol=2e-6, atol=atol)
    assert (lps[:, 1:] <= lps[:, :-1]).all(), "not sorted descending"
    assert (ids.sort(1).values.diff(dim=1) > 0).all(), "repeated ids"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_exact_topk_matches_reference(backend, shape, temperature):
    n, h, v, k = shape
    hidden, weight, bias = problem(n, h, v)
    ids, lps = sk.fused_linear_topk_logprobs(hidden, weight, k, temperature=temperature,
                                             bias=bias, backend=backend)
    assert ids.shape == lps.shape == (n, k)
    ref = ref_logprobs(hidden, weight, bias, temperature)
    check_topk(ids, lps, ref, k, atol=2e-6)
    # Real-valued logits have no ties: the ids are exactly the reference's.
    assert (ids == ref.topk(k, dim=1).indices).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_and_batched(backend, dtype):
    hidden, weight, bias = problem(24, 16, 257, dtype=dtype)
    hidden = hidden.reshape(3, 8, 16)
    ids, lps = sk.fused_linear_topk_logprobs(hidden, weight, 10, bias=bias, backend=backend)
    assert ids.shape == lps.shape == (3, 8, 10)
    # bf16 logits tie often: compare values, and the values at the returned ids.
    check_topk(ids, lps, ref_logprobs(hidden, weight, bias, 1.0), 10, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_pick_distinct_ids_with_the_tied_value(backend):
    weight = torch.zeros(50, 3)
    weight[7] = 1.0
    hidden = torch.ones(4, 3)
    ids, lps = sk.fused_linear_topk_logprobs(hidden, weight, 5, backend=backend)
    assert (ids[:, 0] == 7).all()
    check_topk(ids, lps, ref_logprobs(hidden, weight, None, 1.0), 5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_and_no_grad(backend):
    hidden, weight, bias = problem(29, 7, 199)
    hidden.requires_grad_()
    one = sk.fused_linear_topk_logprobs(hidden, weight, 9, bias=bias, backend=backend)
    many = sk.fused_linear_topk_logprobs(hidden, weight, 9, bias=bias, backend=backend,
                                         memory_budget=5 * 199 * 16)
    assert not one[1].requires_grad
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_output_feeds_ckd_loss(backend):
    hidden, weight, bias = problem(13, 6, 83)
    ids, lps = sk.fused_linear_topk_logprobs(hidden, weight, 7, bias=bias, backend=backend)
    loss = sk.fused_linear_ckd_loss(hidden, weight, ids, lps, bias=bias, student_topm=7,
                                    backend="torch")
    # Student == teacher: the top-k KL is 0 and no confident mistakes exist.
    assert abs(loss.item()) < 1e-6


# ------------------------------------------------------------------ sampling


def check_sampled_structure(ids, lps, k):
    ids, lps = ids.reshape(-1, k), lps.reshape(-1, k)
    drawn = torch.isfinite(lps)
    counts = torch.where(drawn, (lps.double().exp() * k).round(), 0.0)
    torch.testing.assert_close(torch.where(drawn, lps.double(), 0.0),
                               torch.where(drawn, (counts / k).log(), 0.0), atol=1e-6, rtol=0)
    assert (counts.sum(1) == k).all(), "draws do not add up to k"
    assert (drawn[:, 0]).all() and (drawn[:, 1:] <= drawn[:, :-1]).all(), "padding not last"
    assert (ids[~drawn] == 0).all() and (lps[~drawn] == float("-inf")).all()
    assert (lps[:, 1:] <= lps[:, :-1]).all(), "not sorted descending"
    real = torch.where(drawn, ids, -1 - torch.arange(k).expand_as(ids))
    assert (real.sort(1).values.diff(dim=1) != 0).all(), "an id appears twice"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_statistics_match_teacher_distribution(backend):
    v, n, k = 23, 3000, 8
    hidden, weight, bias = problem(1, 5, v)
    temperature = 1.4
    probs = ref_logprobs(hidden, weight, bias, temperature).exp()[0]
    gen = torch.Generator().manual_seed(1234)
    ids, lps = sk.fused_linear_topk_logprobs(hidden.expand(n, -1), weight, k,
                                             temperature=temperature, bias=bias, sample=True,
                                             generator=gen, backend=backend)
    check_sampled_structure(ids, lps, k)
    # Each row's weights are an unbiased estimate of the distribution.
    est = torch.zeros(n, v, dtype=torch.float64).scatter_add_(
        1, ids, torch.where(torch.isfinite(lps), lps.double().exp(), 0.0)).mean(0)
    stderr = (probs * (1 - probs) / (n * k)).sqrt()
    assert ((est - probs).abs() <= 5 * stderr + 1e-3).all(), (est - probs).abs().max()


def test_sampling_is_reproducible_and_feeds_ckd():
    hidden, weight, bias = problem(17, 6, 61, dtype=torch.float32)
    hidden = hidden.reshape(1, 17, 6)

    def draw(seed):
        return sk.fused_linear_topk_logprobs(hidden, weight, 12, bias=bias, sample=True,
                                             generator=torch.Generator().manual_seed(seed),
                                             backend="torch", memory_budget=4 * 61 * 16)
    a, b, c = draw(5), draw(5), draw(6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (1, 17, 12)
    check_sampled_structure(*a, 12)
    loss = sk.fused_linear_ckd_loss(hidden, weight, *a, bias=bias, student_topm=5,
                                    backend="torch", tail_bucket=True)
    assert torch.isfinite(loss)


def test_sampling_a_one_hot_distribution_gives_a_single_id():
    weight = torch.zeros(30, 2)
    weight[11, 0] = 100.0
    ids, lps = sk.fused_linear_topk_logprobs(torch.ones(3, 2), weight, 4, sample=True,
                                             backend="torch")
    assert (ids[:, 0] == 11).all() and (lps[:, 0] == 0).all()
    assert (lps[:, 1:] == float("-inf")).all() and (ids[:, 1:] == 0).all()


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("over,match", [
    (dict(k=0), "k must be an int in"),
    (dict(k=20), r"k must be an int in \[1, V=19\]"),
    (dict(k=2.0), "k must be an int"),
    (dict(temperature=0.0), "temperature"),
    (dict(generator=torch.Generator()), "only used with sample=True"),
    (dict(sample=True, generator=3), "generator must be a torch.Generator"),
    (dict(backend="gpu"), "backend must be one of"),
    (dict(hidden=torch.zeros(2, 3, 4, 5)), "hidden must be"),
    (dict(weight=torch.zeros(19, 5)), "hidden size"),
    (dict(weight=torch.zeros(19, 4, dtype=torch.bfloat16), hidden=torch.zeros(6, 4).half()),
     "float16 and bfloat16 have no common lower precision"),
    (dict(bias=torch.zeros(18)), "bias must be"),
    (dict(memory_budget=0), "memory_budget"),
])
def test_bad_input_names_the_argument(over, match):
    args = dict(hidden=torch.zeros(6, 4), weight=torch.zeros(19, 4), k=3, backend="torch")
    args.update(over)
    with pytest.raises((ValueError, TypeError), match=match):
        sk.fused_linear_topk_logprobs(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_topk_on_cuda_at_qwen_vocab(dtype):
    hidden, weight, bias = problem(67, 64, 151936, dtype=dtype)
    hidden, weight, bias = hidden.cuda(), weight.cuda(), bias.cuda()
    ids, lps = sk.fused_linear_topk_logprobs(hidden, weight, 100, bias=bias, backend="triton")
    ref = ref_logprobs(hidden, weight, bias, 1.0)
    check_topk(ids, lps, ref, 100, atol=5e-5 if dtype == torch.bfloat16 else 2e-5)
