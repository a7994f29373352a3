"""Issue 10, item 4: fused CKD distillation on TRL's SFT data path (tiny models, CPU).

The cache path (teacher columns in a pre-tokenized dataset) and the on-the-fly path
(a teacher model) give the loss star_kernels.hf computes directly on the same batch,
training lowers it, and self-distillation through TRL's own tokenization is 0.
"""

import contextlib
import copy

import pytest
import torch

from hf_models import VOCAB, tiny
from star_kernels import hf

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
from star_kernels.trl import CKDSFTTrainer, TeacherColumnsCollator  # noqa: E402

K = 8
KNOBS = {"student_topm": K, "tail_coef": 2.0, "tail_bucket": True}
LENGTHS = (9, 12, 7, 11)
PROMPT = 4


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0",
                                                eos_token="w1", unk_token="w3")


def token_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(4, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "completion_mask": [0] * PROMPT + [1] * (n - PROMPT)})
    return out


def with_cache(rows, teacher):
    """Teacher columns as a cache holds them: [len(input_ids) - 1, K] per row."""
    out = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        t_ids, t_logps = hf.teacher_topk_from_model(teacher, ids, k=K)
        out.append({**row, "teacher_ids": t_ids[0].tolist(),
                    "teacher_logprobs": t_logps[0].tolist()})
    return out


def config(tmp_path, steps=1, **kw):
    """fp32 unless told (TRL's SFTConfig defaults to bf16=True, which these tests also run)."""
    kw = {"bf16": False, "completion_only_loss": True, **kw}
    return trl.SFTConfig(output_dir=str(tmp_path), max_steps=steps, learning_rate=1e-2,
                         per_device_train_batch_size=len(LENGTHS), logging_steps=1,
                         report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                         shuffle_dataset=False, **kw)


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def direct_loss(student, trainer, teacher=None, autocast=None):
    """The fused loss star_kernels.hf computes on the batch TRL's data path produces."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(LENGTHS))])
    with torch.no_grad(), autocast or contextlib.nullcontext():
        if teacher is not None:
            batch["teacher_ids"], batch["teacher_logprobs"] = hf.teacher_topk_from_model(
                teacher, batch["input_ids"], batch["attention_mask"], K,
                loss_mask=batch["labels"] != -100)
        return hf.ckd_compute_loss(student, batch, **KNOBS).item(), batch


def test_cache_columns_survive_trl_and_give_the_direct_loss(tmp_path):
    teacher, student = tiny("qwen3", seed=1), tiny("qwen3", seed=0)
    ds = datasets.Dataset.from_list(with_cache(token_rows(), teacher))
    trainer = CKDSFTTrainer(model=student, args=config(tmp_path, steps=8), train_dataset=ds,
                            processing_class=tokenizer(), ckd_kwargs=KNOBS)
    start, batch = direct_loss(student, trainer)
    assert batch["teacher_ids"].shape == (4, max(LENGTHS) - 1, K)
    trainer.train()
    losses = logged_losses(trainer)
    assert losses[0] == pytest.approx(start, rel=1e-4)
    assert losses[-1] < 0.7 * losses[0]


def test_on_the_fly_teacher_gives_the_same_loss_as_its_cache(tmp_path):
    teacher, student = tiny("llama", seed=1), tiny("llama", seed=0)
    cached = CKDSFTTrainer(model=copy.deepcopy(student), args=config(tmp_path / "a"),
                           train_dataset=datasets.Dataset.from_list(
                               with_cache(token_rows(), teacher)),
                           processing_class=tokenizer(), ckd_kwargs=KNOBS)
    cached.train()
    live = CKDSFTTrainer(model=copy.deepcopy(student), args=config(tmp_path / "b"),
                         train_dataset=datasets.Dataset.from_list(token_rows()),
                         processing_class=tokenizer(), ckd_kwargs=KNOBS,
                         teacher_model=teacher, teacher_k=K)
    live.train()
    start, _ = direct_loss(student, live, teacher)
    assert logged_losses(live)[0] == pytest.approx(logged_losses(cached)[0], rel=1e-4)
    assert logged_losses(live)[0] == pytest.approx(start, rel=1e-4)


def test_trl_default_bf16_is_the_direct_loss_under_bf16_autocast(tmp_path):
    teacher, student = tiny("llama", seed=1), tiny("llama", seed=0)
    trainer = CKDSFTTrainer(model=student, args=config(tmp_path, bf16=True),
                            train_dataset=datasets.Dataset.from_list(token_rows()),
                            processing_class=tokenizer(), ckd_kwargs=KNOBS,
                            teacher_model=teacher, teacher_k=K)
    fp32, _ = direct_loss(student, trainer, teacher)
    bf16, _ = direct_loss(student, trainer, teacher, torch.autocast("cpu", dtype=torch.bfloat16))
    trainer.train()
    assert logged_losses(trainer)[0] == pytest.approx(bf16, rel=1e-4)
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=5e-2)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_self_distillation_through_trl_tokenization_is_zero(tmp_path, bf16):
    """Prompt-completion text: TRL tokenizes and masks; the teacher is the student."""
    student = tiny("qwen3")
    rows = [{"prompt": " ".join(f"w{5 + i + j}" for j in range(4)),
             "completion": "".join(f" w{40 + 3 * i + j}" for j in range(3 + i))}
            for i in range(4)]
    args = config(tmp_path, completion_only_loss=None, bf16=bf16)
    trainer = CKDSFTTrainer(model=student, args=args,
                            train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tokenizer(), ckd_kwargs=KNOBS,
                            teacher_model=copy.deepcopy(student), teacher_k=K)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert (batch["labels"][:, :4] == -100).all()         # the prompt does not count
    trainer.train()
    # bf16: the teacher's top-k op and the student's CKD op round their GEMMs differently.
    assert abs(logged_losses(trainer)[0]) < (1e-4 if bf16 else 1e-5)


def test_collator_pads_truncates_and_refuses_misaligned_rows():
    base = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id=0)
    rows = with_cache(token_rows(), tiny("llama"))
    batch = TeacherColumnsCollator(base)(rows[:2])
    assert batch["input_ids"].shape == (2, 12) and batch["teacher_ids"].shape == (2, 11, K)
    assert torch.isneginf(batch["teacher_logprobs"][0, 8:]).all()   # row 0 has 8 predictions
    assert torch.equal(batch["teacher_ids"][1], torch.tensor(rows[1]["teacher_ids"]))
    # TRL truncated input_ids to 6 tokens: keep the predictions inside the window.
    cut = [{**r, "input_ids": r["input_ids"][:6], "completion_mask": r["completion_mask"][:6]}
           for r in rows[:2]]
    batch = TeacherColumnsCollator(base)(cut)
    assert torch.equal(batch["teacher_ids"][1], torch.tensor(rows[1]["teacher_ids"][:5]))
    batch = TeacherColumnsCollator(base, "keep_end")(cut)
    assert torch.equal(batch["teacher_ids"][1], torch.tensor(rows[1]["teacher_ids"][-5:]))
    short = [{**rows[0], "teacher_ids": rows[0]["teacher_ids"][:-1],
              "teacher_logprobs": rows[0]["teacher_logprobs"][:-1]}]
    with pytest.raises(ValueError, match=r"7 teacher entries for 9 input_ids.*input_ids\) - 1"):
        TeacherColumnsCollator(base)(short)


def test_packing_and_a_missing_teacher_are_refused(tmp_path):
    with pytest.raises(ValueError, match="packing"):
        CKDSFTTrainer(model=tiny("llama"), args=config(tmp_path, packing=True, max_length=16),
                      train_dataset=datasets.Dataset.from_list(token_rows()),
                      processing_class=tokenizer())
    trainer = CKDSFTTrainer(model=tiny("llama"), args=config(tmp_path),
                            train_dataset=datasets.Dataset.from_list(token_rows()),
                            processing_class=tokenizer(), ckd_kwargs=KNOBS)
    with pytest.raises(KeyError, match="teacher_ids"):
        trainer.train()


@pytest.mark.parametrize(("loss_type", "beta", "iterations"),
                         [("dapo", 0.1, 2), ("grpo", 0.0, 1), ("bnpo", 0.0, 1)])
def test_fused_grpo_mixin_equals_trls_own_loss(tmp_path, loss_type, beta, iterations):
    """A real GRPOTrainer run (generation, rewards, advantages): on every batch, the fused
    loss and its gradient equal TRL's own unfused _compute_loss on the same inputs."""
    from star_kernels.trl import FusedGRPOMixin

    seen = []

    class Fused(FusedGRPOMixin, trl.GRPOTrainer):
        def _compute_loss(self, model, inputs):
            # The fused op's backward scales gradients it made in forward, in place: one
            # backward per call, so the loss returned for training is a separate call.
            ours = super()._compute_loss(model, inputs)
            theirs = trl.GRPOTrainer._compute_loss(self, model, inputs)
            w = model.lm_head.weight
            g_ours, g_theirs = (torch.autograd.grad(x, w)[0] for x in (ours, theirs))
            seen.append((ours.item(), theirs.item(), g_ours, g_theirs,
                         "old_per_token_logps" in inputs))
            return super()._compute_loss(model, inputs)

    def reward(completions, **kwargs):
        return [float(sum(map(ord, c)) % 5) for c in completions]

    prompts = datasets.Dataset.from_list(
        [{"prompt": " ".join(f"w{10 + i + j}" for j in range(3 + i % 2))} for i in range(8)])
    args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=2, learning_rate=1e-2,
                          per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=5, loss_type=loss_type, beta=beta,
                          num_iterations=iterations, use_bias_correction_kl=False,
                          bf16=False, report_to=[],
                          save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    tok = tokenizer()
    tok.padding_side = "left"
    # TRL loads the reference model (beta != 0) from the policy's path: save it first.
    # Unsharpened logits: the two samples of a prompt differ, so advantages are not 0.
    tiny("qwen3", sharpen=1.0).save_pretrained(tmp_path / "policy")
    trainer = Fused(model=str(tmp_path / "policy"), reward_funcs=reward, args=args,
                    train_dataset=prompts, processing_class=tok)
    trainer.train()
    assert len(seen) == 2
    assert any(s[4] for s in seen) == (iterations > 1)   # old log-probs only when reused
    for ours, theirs, g_ours, g_theirs, _ in seen:
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-3, atol=1e-6)
    assert all(s[2].abs().max() > 1e-4 for s in seen)      # a gradient that can differ


def test_fused_grpo_mixin_refuses_what_it_does_not_compute(tmp_path):
    from star_kernels.trl import FusedGRPOMixin, _check_grpo_settings

    class Fake:
        loss_type, top_entropy_quantile, off_policy_mask_threshold = "cispo", 1.0, None
        beta, use_vllm = 0.0, False
        args = trl.GRPOConfig(output_dir=str(tmp_path), importance_sampling_level="sequence",
                              report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"loss_type='cispo'.*importance_sampling_level"):
        _check_grpo_settings(Fake())
    assert FusedGRPOMixin._compute_loss
