"""Issue 10, item 2: bf16 / fp16 mixed precision reaches the fused ops through star_kernels.hf.

The fused ops run their GEMMs in the dtype of the ambient autocast. A helper that is
called outside the autocast (as CKDTrainerMixin was: accelerate's autocast wraps
model.forward, which the helpers bypass) runs the lm_head in fp32: nothing fails, the
run is just not mixed precision. A spy records the dtype each op call computes in (the
autocast dtype when autocast is on, else its inputs'); the values are checked against
the model's own logits under the same autocast, and against fp32 to show they differ.
"""

from typing import ClassVar

import pytest
import torch

from hf_models import VOCAB, batch, tiny
from star_kernels import hf, reference

transformers = pytest.importorskip("transformers")

K = 6
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def seen(monkeypatch):
    """Record ``(op, compute dtype)`` of every fused op call made by star_kernels.hf."""
    calls = []

    def spy(name):
        op = getattr(hf, name)

        def wrapper(hidden, weight, *args, **kwargs):
            on = torch.is_autocast_enabled(hidden.device.type)
            calls.append((name, torch.get_autocast_dtype("cpu") if on else hidden.dtype))
            return op(hidden, weight, *args, **kwargs)
        monkeypatch.setattr(hf, name, wrapper)

    for name in ("fused_linear_ckd_loss", "fused_linear_logprobs", "fused_linear_grpo_loss",
                 "fused_linear_topk_logprobs"):
        spy(name)
    return calls


def teacher_from_logits(logits, k=K):
    logps, ids = logits[:, :-1].double().log_softmax(-1).topk(k, dim=-1)
    return ids, logps.float()


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_ckd_helper_runs_the_head_in_the_autocast_dtype(dtype, seen):
    model = tiny("qwen3")
    d = batch()
    g = torch.Generator().manual_seed(1)
    t_ids, t_logps = teacher_from_logits(torch.randn(3, 11, VOCAB, generator=g) * 3)
    knobs = {"student_topm": K, "tail_coef": 2.0}
    fp32 = hf.ckd_loss_from_model(model, **d, teacher_ids=t_ids, teacher_logprobs=t_logps,
                                  **knobs)
    with torch.autocast("cpu", dtype=dtype):
        loss = hf.ckd_loss_from_model(model, **d, teacher_ids=t_ids, teacher_logprobs=t_logps,
                                      **knobs)
        logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
    assert seen == [("fused_linear_ckd_loss", torch.float32), ("fused_linear_ckd_loss", dtype)]
    assert abs(loss.item() - fp32.item()) > 1e-6          # really computed in 16 bits
    assert logits.dtype == dtype                          # what autocast does to lm_head
    mask = (d["loss_mask"] & (d["attention_mask"] != 0))[:, 1:]
    want = reference.ckd_token_losses(logits[:, :-1][mask].double(), t_ids[mask], t_logps[mask],
                                      **knobs).mean()
    torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-2)
    loss.backward()                                       # gradients reach the fp32 parameters
    assert model.lm_head.weight.grad.dtype == torch.float32
    assert model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_logprob_grpo_and_teacher_helpers_under_autocast(dtype, seen):
    model = tiny("llama")
    d = batch()
    with torch.autocast("cpu", dtype=dtype):
        lp = hf.logprobs_from_model(model, d["input_ids"], d["attention_mask"])
        logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
        _, logps = hf.teacher_topk_from_model(model, d["input_ids"], d["attention_mask"], K)
        loss, _ = hf.grpo_loss_from_model(model, d["input_ids"], d["attention_mask"],
                                          d["loss_mask"], torch.ones(3), lp.detach(),
                                          lp.detach())
    assert [c[1] for c in seen] == [dtype] * 3
    want = logits[:, :-1].double().log_softmax(-1)
    torch.testing.assert_close(lp.double(), want.gather(-1, d["input_ids"][:, 1:, None])[..., 0],
                               rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(logps.double(), want.topk(K, dim=-1).values, rtol=2e-2, atol=2e-2)
    loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32


def test_no_autocast_keeps_the_model_dtype(seen):
    model = tiny("llama")
    d = batch()
    hf.logprobs_from_model(model, d["input_ids"], d["attention_mask"])
    model = model.to(torch.bfloat16)
    hf.logprobs_from_model(model, d["input_ids"], d["attention_mask"])
    assert [c[1] for c in seen] == [torch.float32, torch.bfloat16]


def rows(d, t_ids, t_logps):
    labels = torch.where(d["loss_mask"], d["input_ids"], -100)
    return [{"input_ids": d["input_ids"][i], "attention_mask": d["attention_mask"][i],
             "labels": labels[i], "teacher_ids": t_ids[i], "teacher_logprobs": t_logps[i]}
            for i in range(len(labels))]


def test_trainer_bf16_reaches_the_fused_op(tmp_path, seen):
    """Trainer(bf16=True): accelerate's autocast wraps model.forward, which the mixin bypasses."""
    pytest.importorskip("accelerate")
    model = tiny("llama")
    d = batch()
    g = torch.Generator().manual_seed(2)
    t_ids, t_logps = teacher_from_logits(torch.randn(3, 11, VOCAB, generator=g) * 3)

    class CKDTrainer(hf.CKDTrainerMixin, transformers.Trainer):
        ckd_kwargs: ClassVar[dict] = {"student_topm": K}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, bf16=True,
        learning_rate=1e-2, remove_unused_columns=False, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True)
    trainer = CKDTrainer(model=model, args=args, train_dataset=rows(d, t_ids, t_logps))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert seen and all(c == ("fused_linear_ckd_loss", torch.bfloat16) for c in seen)
    assert model.lm_head.weight.dtype == torch.float32    # mixed precision: fp32 parameters
