"""star_kernels.hf on tiny Qwen3 / Llama models built from configs: equal to the plain logits."""

from typing import ClassVar

import pytest
import torch

import star_kernels as sk
from star_kernels import hf, reference

transformers = pytest.importorskip("transformers")

VOCAB, B, T = 301, 3, 11


def tiny(kind, seed=0):
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64}
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=8, tie_word_embeddings=True, **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(cfg)
    model.float().train()
    with torch.no_grad():  # sharper logits than the default init, so the losses are not flat
        model.lm_head.weight.mul_(20.0)
    return model


def checkpoint(model):
    """Gradient checkpointing on (renamed activation_checkpointing_enable in transformers 5)."""
    (getattr(model, "activation_checkpointing_enable", None)
     or model.gradient_checkpointing_enable)()


def batch(seed=0, k=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, 8:] = 0                                      # right padding
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    loss_mask[:, 4:] = True                              # response tokens
    # One teacher distribution per next-token prediction: [B, T - 1, k] (see star_kernels.hf).
    teacher = (torch.randn(B, T - 1, VOCAB, generator=g) * 3).log_softmax(-1)
    t_lps, t_ids = teacher.topk(k, dim=-1)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "teacher_ids": t_ids,
                "teacher_logprobs": t_lps}


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_grads_close(got, exp, tol=2e-5):
    for a, b in zip(got, exp):
        if b is None:
            assert a is None or (a == 0).all()
            continue
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def plain_ckd(model, d, **knobs):
    logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
    mask = (d["loss_mask"] & (d["attention_mask"] != 0))[:, 1:].reshape(-1)
    per_tok = reference.ckd_token_losses(
        logits[:, :-1].reshape(-1, VOCAB), d["teacher_ids"].reshape(-1, 6),
        d["teacher_logprobs"].reshape(-1, 6), **knobs)
    return (per_tok * mask).sum() / mask.sum()


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_ckd_loss_matches_plain_logits(kind, checkpointing):
    model = tiny(kind)
    if checkpointing:
        checkpoint(model)
    d = batch()
    knobs = {"tail_coef": 2.0, "student_topm": 7, "temperature": 1.2}
    calls, mlp = [], model.model.layers[0].mlp
    forward = mlp.forward  # module hooks do not run in the recompute: wrap forward itself
    mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    loss = hf.ckd_loss_from_model(model, **d, backend="torch", **knobs)
    got = grads(model, loss)
    assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward when checkpointed
    exp = plain_ckd(model, d, **knobs)
    torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-5)
    assert_grads_close(got, grads(model, exp))


def test_tied_head_is_the_embedding():
    model = tiny("qwen3")
    _, weight, bias = hf.hidden_states(model, batch()["input_ids"][:, :3])
    assert weight is model.model.embed_tokens.weight and bias is None
    _, head = hf.decoder_and_head(tiny("llama"))
    assert head is not None and head.weight is not tiny("llama").model.embed_tokens.weight


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_logprobs_and_entropy_match_plain_logits(kind):
    model = tiny(kind)
    checkpoint(model)
    d = batch()
    lp, ent = hf.logprobs_from_model(model, d["input_ids"], d["attention_mask"],
                                     temperature=0.9, return_entropy=True, backend="triton")
    logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
    logq = (logits[:, :-1] / 0.9).log_softmax(-1)
    exp_lp = logq.gather(-1, d["input_ids"][:, 1:, None])[..., 0]
    exp_ent = -(logq.exp() * logq).sum(-1)
    assert lp.shape == (B, T - 1)
    torch.testing.assert_close(lp, exp_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, exp_ent, rtol=1e-5, atol=1e-5)
    w = torch.randn(B, T - 1)
    # The expected gradient is fp32 autograd through 301-wide softmaxes of logits scaled by 20,
    # itself off by a few 1e-5 (seen: 5.5e-5 on one element of 9,632): hence 1e-4.
    assert_grads_close(grads(model, (lp * w).sum() + ent.sum()),
                       grads(model, (exp_lp * w).sum() + exp_ent.sum()), tol=1e-4)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_grpo_loss_matches_plain_logits(kind):
    model = tiny(kind)
    checkpoint(model)
    d = batch()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
        cur = logits[:, :-1].log_softmax(-1).gather(-1, d["input_ids"][:, 1:, None])[..., 0]
    old = cur + 0.3 * torch.randn(cur.shape, generator=g)
    ref = cur + 0.5 * torch.randn(cur.shape, generator=g)
    adv = torch.randn(B, generator=g)
    knobs = {"kl_coef": 0.1, "loss_agg": "seq_mean"}
    loss, diag = hf.grpo_loss_from_model(model, d["input_ids"], d["attention_mask"],
                                         d["loss_mask"], adv, old, ref, backend="torch", **knobs)
    logits = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"]).logits
    mask = (d["loss_mask"] & (d["attention_mask"] != 0))[:, 1:]
    exp, _ = sk.fused_linear_grpo_loss(logits[:, :-1], torch.eye(VOCAB), d["input_ids"][:, 1:],
                                       adv, mask, old, ref, backend="torch", **knobs)
    torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-5)
    assert 0 < diag["clip_fraction"] < 1
    assert_grads_close(grads(model, loss), grads(model, exp))


def test_compiled_trunk():
    # The default inductor backend (about 30 s of compiling on 2 CPU cores).
    model = tiny("qwen3")
    d = batch()
    exp = hf.ckd_loss_from_model(model, **d, student_topm=5, backend="torch")
    exp_g = grads(model, exp)
    model.model.compile(dynamic=False)
    loss = hf.ckd_loss_from_model(model, **d, student_topm=5, backend="torch")
    torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads(model, loss), exp_g)


def test_trainer_compute_loss_and_mixin():
    model = tiny("llama")
    d = batch()
    labels = torch.where(d["loss_mask"], d["input_ids"], -100)
    inputs = {k: v for k, v in d.items() if k != "loss_mask"} | {"labels": labels}
    mean = hf.ckd_compute_loss(model, inputs, student_topm=5, backend="torch")
    n_items = int((labels[:, 1:] != -100).sum())
    summed, outputs = hf.ckd_compute_loss(model, inputs, return_outputs=True,
                                          num_items_in_batch=2 * n_items, student_topm=5,
                                          backend="torch")
    # labels != -100 counts padding of sequence 1 too; the attention mask removes it.
    kept = int(((labels != -100) & (d["attention_mask"] != 0))[:, 1:].sum())
    torch.testing.assert_close(summed, mean * kept / (2 * n_items))
    assert outputs["loss"] is summed

    class Trainer(hf.CKDTrainerMixin):
        ckd_kwargs: ClassVar[dict] = {"student_topm": 5, "backend": "torch"}
    torch.testing.assert_close(Trainer().compute_loss(model, inputs), mean)


def test_bad_models_are_named():
    with pytest.raises(TypeError, match="not a causal LM"):
        hf.decoder_and_head(torch.nn.Linear(3, 4))
    model = tiny("llama")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hf.decoder_and_head(model)
    with pytest.raises(ValueError, match="teacher_ids must be"):
        hf.ckd_loss_from_model(tiny("llama"), **{**batch(), "teacher_ids": torch.zeros(B, 4, 6)})


def test_real_trainer_steps_with_the_mixin(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny("llama")
    d = batch()
    labels = torch.where(d["loss_mask"], d["input_ids"], -100)
    rows = [{"input_ids": d["input_ids"][i], "attention_mask": d["attention_mask"][i],
             "labels": labels[i], "teacher_ids": d["teacher_ids"][i],
             "teacher_logprobs": d["teacher_logprobs"][i]} for i in range(B)]

    class CKDTrainer(hf.CKDTrainerMixin, transformers.Trainer):
        ckd_kwargs: ClassVar[dict] = {"student_topm": 5, "backend": "torch"}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=B,
        learning_rate=1e-2, remove_unused_columns=False, report_to=[], save_strategy="no",
        logging_steps=1, use_cpu=True, disable_tqdm=True)
    before = model.lm_head.weight.detach().clone()
    start = hf.ckd_compute_loss(model, {k: torch.stack([r[k] for r in rows]) for k in rows[0]},
                                student_topm=5, backend="torch").item()
    result = CKDTrainer(model=model, args=args, train_dataset=rows).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.lm_head.weight.detach())
    end = hf.ckd_compute_loss(model, {k: torch.stack([r[k] for r in rows]) for k in rows[0]},
                              student_topm=5, backend="torch").item()
    assert end < start
