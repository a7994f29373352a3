"""Issue 10, item 3: a patched forward computes the fused loss inside ``model(**batch)``.

Every family, tiny configs: against the unpatched model's own logits (fp64 reference),
in fp32 and under autocast; unchanged behaviour without the fused arguments.
"""

import copy

import pytest
import torch

from hf_models import FAMILIES, VOCAB, batch, grads, softcapped_gemma2, tiny
from star_kernels import hf, patching, reference

transformers = pytest.importorskip("transformers")

K = 6
KNOBS = {"student_topm": 8, "tail_coef": 3.0}


def teacher(seed=1):
    g = torch.Generator().manual_seed(seed)
    logps, ids = (torch.randn(3, 10, VOCAB, generator=g) * 3).log_softmax(-1).topk(K, dim=-1)
    return ids, logps


def reference_ckd(logits, d, t_ids, t_logps):
    mask = (d["loss_mask"] & (d["attention_mask"] != 0))[:, 1:]
    return reference.ckd_token_losses(logits[:, :-1][mask].double(), t_ids[mask], t_logps[mask],
                                      **KNOBS).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_forward_is_the_ckd_loss_of_the_unpatched_logits(family):
    model = tiny(family)
    d = batch()
    t_ids, t_logps = teacher()
    plain = copy.deepcopy(model)
    patching.patch_model(model, **KNOBS)
    out = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"],
                loss_mask=d["loss_mask"], teacher_ids=t_ids, teacher_logprobs=t_logps)
    assert out.logits is None and out.log_probs is None
    logits = plain(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
    want = reference_ckd(logits, d, t_ids, t_logps)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads(model, out.loss), grads(plain, want.float()), strict=True):
        if exp is not None:
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_fused_arguments_nothing_changes(family):
    model = tiny(family).eval()
    d = batch()
    labels = torch.where(d["loss_mask"], d["input_ids"], -100)
    before = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"], labels=labels)
    gen = model.generate(d["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    patching.patch_model(model)
    assert patching.is_patched(model)
    after = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"], labels=labels)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)
    assert torch.equal(model.generate(d["input_ids"][:1, :5], max_new_tokens=3,
                                      do_sample=False), gen)
    patching.unpatch_model(model)
    assert not patching.is_patched(model)


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_patched_forward_under_autocast(family, dtype, monkeypatch):
    model = patching.patch_model(tiny(family), **KNOBS)
    d = batch()
    t_ids, t_logps = teacher()
    seen = []
    op = hf.fused_linear_ckd_loss
    monkeypatch.setattr(hf, "fused_linear_ckd_loss", lambda h, *a, **k: seen.append(
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")) or op(h, *a, **k))
    with torch.autocast("cpu", dtype=dtype):
        out = model(d["input_ids"], d["attention_mask"], loss_mask=d["loss_mask"],
                    teacher_ids=t_ids, teacher_logprobs=t_logps)
        logits = model(d["input_ids"], d["attention_mask"]).logits
    assert seen == [dtype] and logits.dtype == dtype
    torch.testing.assert_close(out.loss.double(), reference_ckd(logits, d, t_ids, t_logps),
                               rtol=2e-2, atol=2e-2)
    out.loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma2"])
def test_fused_logprobs_for_rl(family):
    model = patching.patch_model(tiny(family))
    d = batch()
    out = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"],
                fused_logprobs=True, return_entropy=True, ckd_kwargs={"temperature": 0.8})
    assert out.logits is None and out.loss is None
    logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
    logq = (logits[:, :-1].double() / 0.8).log_softmax(-1)
    torch.testing.assert_close(out.log_probs.double(),
                               logq.gather(-1, d["input_ids"][:, 1:, None])[..., 0],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), -(logq.exp() * logq).sum(-1),
                               rtol=1e-5, atol=1e-5)


def test_trainer_style_call_with_labels_and_num_items():
    """What Trainer passes: labels (-100 outside the response) and num_items_in_batch."""
    model = patching.patch_model(tiny("llama"), **KNOBS)
    d = batch()
    t_ids, t_logps = teacher()
    labels = torch.where(d["loss_mask"], d["input_ids"], -100)
    mean = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"],
                 teacher_ids=t_ids, teacher_logprobs=t_logps, labels=labels).loss
    summed = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"],
                   teacher_ids=t_ids, teacher_logprobs=t_logps, labels=labels,
                   num_items_in_batch=40).loss
    counted = int(((labels != -100) & (d["attention_mask"] != 0))[:, 1:].sum())
    torch.testing.assert_close(summed, mean * counted / 40)
    # Per-call knobs override the patch-time defaults.
    other = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"],
                  teacher_ids=t_ids, teacher_logprobs=t_logps, labels=labels,
                  ckd_kwargs={"tail_coef": 0.0}).loss
    assert other.item() < mean.item()


def test_class_patch_applies_to_new_models_and_is_undone():
    try:
        patching.patch_class("qwen2", **KNOBS)
        model = tiny("qwen2")
        assert patching.is_patched(model)
        d = batch()
        t_ids, t_logps = teacher()
        out = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"],
                    loss_mask=d["loss_mask"], teacher_ids=t_ids, teacher_logprobs=t_logps)
        logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
        torch.testing.assert_close(out.loss.double(), reference_ckd(logits, d, t_ids, t_logps),
                                   rtol=1e-5, atol=1e-5)
    finally:
        patching.unpatch_class("qwen2")
    assert not patching.is_patched(tiny("qwen2"))
    # transformers' forward swallows unknown keyword arguments: an unpatched model ignores
    # the teacher and returns logits, which is how to tell.
    out = tiny("qwen2")(input_ids=batch()["input_ids"], teacher_ids=t_ids, teacher_logprobs=t_logps)
    assert out.logits is not None and out.loss is None


def test_softcapped_gemma2_and_misuse_are_refused():
    with pytest.raises(ValueError, match=r"cannot patch Gemma2ForCausalLM.*"
                                         r"final_logit_softcapping=30\.0"):
        patching.patch_model(softcapped_gemma2())
    with pytest.raises(ValueError, match="family must be one of"):
        patching.patch_class("gpt2")
    model = patching.patch_model(tiny("llama"))
    d = batch()
    t_ids, t_logps = teacher()
    with pytest.raises(ValueError, match=r"\['loss_mask'\] given without teacher_ids"):
        model(input_ids=d["input_ids"], loss_mask=d["loss_mask"])
    with pytest.raises(ValueError, match="without teacher_logprobs"):
        model(input_ids=d["input_ids"], teacher_ids=t_ids)
    with pytest.raises(ValueError, match="teacher_ids has T=11 positions"):
        model(input_ids=d["input_ids"], teacher_ids=torch.cat([t_ids, t_ids[:, :1]], 1),
              teacher_logprobs=torch.cat([t_logps, t_logps[:, :1]], 1))
