"""Issue 10, item 1: one position convention in star_kernels.hf, and no silent double shift.

Self-distillation (teacher = student) is the check a user can run: the teacher's top-k
from teacher_topk_from_model, fed to the student helpers, must give loss 0 and gradient 0.
What "0" means: the truncated FKL over the teacher's top-k S at q = p is
sum_S p (log p - log q) = 0, and the confident-error mass is 0 because the student's
top-m is S when m = k. Its gradient, P q_v - p_v [v in S] (P = teacher mass on S), is 0
only when P = 1 (k = V) or with the (k+1)-th tail bucket, which makes the objective a
true divergence over k + 1 buckets, minimised at q = p; so those are the two settings
where the gradient must vanish.
"""

import pytest
import torch

import star_kernels as sk
from hf_models import VOCAB, batch, grads, tiny
from star_kernels import hf, reference

transformers = pytest.importorskip("transformers")

K = 7


def max_abs(gs):
    return max(float(g.abs().max()) for g in gs if g is not None)


def self_teacher(model, d, k=K):
    return hf.teacher_topk_from_model(model, d["input_ids"], d["attention_mask"], k,
                                      backend="torch")


ZERO_GRAD_SETTINGS = [{"k": K, "student_topm": K, "tail_coef": 10.0, "tail_bucket": True},
                      {"k": VOCAB, "student_topm": VOCAB, "tail_coef": 10.0, "tail_bucket": False}]


@pytest.mark.parametrize("setting", ZERO_GRAD_SETTINGS, ids=["tail-bucket", "k=V"])
@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_self_distillation_gives_zero_loss_and_gradient(kind, setting):
    model = tiny(kind)
    d = batch()
    knobs = dict(setting)
    t_ids, t_logps = self_teacher(model, d, knobs.pop("k"))
    assert t_ids.shape == (3, 10, t_ids.shape[-1])          # [B, T - 1, k]

    loss = hf.ckd_loss_from_model(model, **d, teacher_ids=t_ids, teacher_logprobs=t_logps,
                                  backend="torch", **knobs)
    assert abs(loss.item()) < 1e-5
    assert max_abs(grads(model, loss)) < 1e-5

    # The same teacher read one token off (what the old label-aligned convention did to
    # top-k taken from the teacher's hidden states) is far from 0: the test can tell.
    full_ids, full_logps = hf.teacher_topk_from_model(
        model, torch.cat([d["input_ids"], d["input_ids"][:, -1:]], 1), k=t_ids.shape[-1],
        backend="torch")
    off = hf.ckd_loss_from_model(model, **d, teacher_ids=full_ids[:, 1:],
                                 teacher_logprobs=full_logps[:, 1:], backend="torch", **knobs)
    assert off.item() > 1.0
    assert max_abs(grads(model, off)) > 1e-2


def test_truncated_fkl_at_q_equals_p_is_zero_but_its_gradient_is_not():
    """Why the zero-gradient checks use the tail bucket or k = V (see the module docstring)."""
    model = tiny("llama")
    d = batch()
    t_ids, t_logps = self_teacher(model, d)
    loss = hf.ckd_loss_from_model(model, **d, teacher_ids=t_ids, teacher_logprobs=t_logps,
                                  student_topm=K, backend="torch")
    assert abs(loss.item()) < 1e-5
    assert max_abs(grads(model, loss)) > 1e-3


def test_self_distillation_through_compute_loss_and_the_trainer_mixin(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny("llama")
    d = batch()
    t_ids, t_logps = self_teacher(model, d)
    labels = torch.where(d["loss_mask"], d["input_ids"], -100)
    inputs = {"input_ids": d["input_ids"], "attention_mask": d["attention_mask"], "labels": labels,
                  "teacher_ids": t_ids, "teacher_logprobs": t_logps}
    knobs = {"student_topm": K, "tail_bucket": True, "backend": "torch"}
    loss = hf.ckd_compute_loss(model, inputs, num_items_in_batch=17, **knobs)
    assert abs(loss.item()) < 1e-5 and max_abs(grads(model, loss)) < 1e-5

    class CKDTrainer(hf.CKDTrainerMixin, transformers.Trainer):
        ckd_kwargs = knobs

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                          remove_unused_columns=False, save_strategy="no")
    trainer = CKDTrainer(model=model, args=args)
    loss = trainer.compute_loss(model, inputs)
    assert abs(loss.item()) < 1e-5 and max_abs(grads(model, loss)) < 1e-5


def test_grpo_against_its_own_logprobs_is_zero():
    """ref = old = the policy's own log-probs, zero advantages: no ratio, no KL, no gradient."""
    model = tiny("qwen3")
    d = batch()
    with torch.no_grad():
        own = hf.logprobs_from_model(model, d["input_ids"], d["attention_mask"], backend="torch")
    adv = torch.zeros(3)
    for est in ("k2", "k3"):
        loss, _ = hf.grpo_loss_from_model(model, d["input_ids"], d["attention_mask"],
                                          d["loss_mask"], adv, own, own, kl_coef=0.5,
                                          kl_estimator=est, backend="torch")
        assert abs(loss.item()) < 1e-5 and max_abs(grads(model, loss)) < 1e-5
    shifted = torch.cat([own[:, 1:], own[:, :1]], 1)      # one token off
    loss, _ = hf.grpo_loss_from_model(model, d["input_ids"], d["attention_mask"],
                                      d["loss_mask"], adv, own, shifted, kl_coef=0.5,
                                      backend="torch")
    assert loss.item() > 1e-2


def test_teacher_topk_from_model_is_the_top_k_of_its_logits():
    model = tiny("qwen3")
    d = batch()
    ids, logps = hf.teacher_topk_from_model(model, d["input_ids"], d["attention_mask"], K,
                                            temperature=1.3)
    logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
    want_logps, want_ids = (logits[:, :-1].double() / 1.3).log_softmax(-1).topk(K, dim=-1)
    assert ids.shape == (3, 10, K) and not logps.requires_grad
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(logps.double(), want_logps, rtol=1e-5, atol=1e-5)

    # With a loss mask only the counted predictions are computed; the rest is padding.
    m_ids, m_logps = hf.teacher_topk_from_model(model, d["input_ids"], d["attention_mask"], K,
                                                loss_mask=d["loss_mask"], temperature=1.3)
    counted = (d["loss_mask"] & (d["attention_mask"] != 0))[:, 1:]
    assert torch.equal(m_ids[counted], ids[counted])
    torch.testing.assert_close(m_logps[counted], logps[counted])
    assert torch.isneginf(m_logps[~counted]).all() and (m_ids[~counted] == 0).all()
    # ... and the student helper takes them with the same mask.
    loss = hf.ckd_loss_from_model(model, **d, teacher_ids=m_ids, teacher_logprobs=m_logps,
                                  student_topm=K, temperature=1.3, backend="torch")
    assert abs(loss.item()) < 1e-5


def test_tensors_in_the_other_layout_are_refused_with_the_convention():
    model = tiny("llama")
    d = batch()
    t_ids, t_logps = self_teacher(model, d)
    full = {"teacher_ids": torch.cat([t_ids, t_ids[:, -1:]], 1),
                "teacher_logprobs": torch.cat([t_logps, t_logps[:, -1:]], 1)}
    with pytest.raises(ValueError, match=r"teacher_ids has T=11 positions.*\[:, :-1\].*\[:, 1:\]"):
        hf.ckd_loss_from_model(model, **d, **full)
    with pytest.raises(ValueError, match=r"teacher_logprobs has T=11"):
        hf.ckd_loss_from_model(model, **d, teacher_ids=t_ids,
                               teacher_logprobs=full["teacher_logprobs"])
    with pytest.raises(ValueError, match=r"loss_mask must be \[B, T\] = \[3, 11\]"):
        hf.ckd_loss_from_model(model, **{**d, "loss_mask": d["loss_mask"][:, 1:]},
                               teacher_ids=t_ids, teacher_logprobs=t_logps)
    with pytest.raises(ValueError, match=r"teacher_ids must start with the batch dimension B=3"):
        hf.ckd_loss_from_model(model, **d, teacher_ids=t_ids[:2], teacher_logprobs=t_logps[:2])
    own = hf.logprobs_from_model(model, d["input_ids"]).detach()
    with pytest.raises(ValueError, match=r"ref_logprobs has T=11 positions"):
        hf.grpo_loss_from_model(model, d["input_ids"], d["attention_mask"], d["loss_mask"],
                                torch.zeros(3), own, torch.cat([own, own[:, :1]], 1))
    with pytest.raises(ValueError, match=r"advantages must be \[B, T - 1\]"):
        hf.grpo_loss_from_model(model, d["input_ids"], d["attention_mask"], d["loss_mask"],
                                torch.zeros(3, 4), own)


def test_a_counted_prediction_without_teacher_entries_is_refused():
    model = tiny("llama")
    d = batch()
    t_ids, t_logps = self_teacher(model, d)
    t_logps = t_logps.clone()
    t_logps[2, 6] = float("-inf")
    with pytest.raises(ValueError, match=r"teacher_logprobs\[2, 6\] is all padding"):
        hf.ckd_loss_from_model(model, **d, teacher_ids=t_ids, teacher_logprobs=t_logps)
    # Once that prediction is masked out, the same teacher tensors are accepted.
    mask = d["loss_mask"].clone()
    mask[2, 7] = False                                     # prediction 6 targets token 7
    loss = hf.ckd_loss_from_model(model, **{**d, "loss_mask": mask}, teacher_ids=t_ids,
                                  teacher_logprobs=t_logps, student_topm=K, backend="torch")
    assert torch.isfinite(loss)


def test_reference_agrees_on_what_self_distillation_means():
    """The fp64 reference, on logits: the same zero the helpers reach."""
    logits = torch.randn(5, VOCAB, dtype=torch.float64) * 3
    logps, ids = logits.log_softmax(-1).topk(K, dim=-1)
    z = logits.clone().requires_grad_()
    loss = reference.ckd_token_losses(z, ids, logps, student_topm=K, tail_bucket=True).sum()
    loss.backward()
    assert abs(loss.item()) < 1e-12 and z.grad.abs().max() < 1e-12
    assert sk is not None
