"""A self-contained CKD run on tiny Qwen3 models built from configs (no downloads).

A frozen random "teacher" and a smaller "student" share a vocabulary; the teacher's
top-k log-probs are cached once, then the student is trained with the fused CKD
loss on its trunk's hidden states (no student logits are ever materialised).
The full-vocabulary KL(teacher || student) on held-out tokens shows it learning.
"""

from __future__ import annotations

import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import star_kernels as sk


def tiny_qwen3(hidden: int, layers: int, vocab: int, seed: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg)


@torch.no_grad()
def teacher_topk(teacher, tokens, k):
    logprobs = teacher(tokens).logits.float().log_softmax(-1)
    return logprobs.topk(k, dim=-1)


@torch.no_grad()
def full_kl(teacher, student, tokens):
    p = teacher(tokens).logits.float().log_softmax(-1)
    q = student(tokens).logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def run(steps: int = 200, vocab: int = 2048, seq: int = 48, batch: int = 8, k: int = 32,
        topm: int = 32, lr: float = 5e-3, seed: int = 0, log_every: int = 50) -> dict:
    teacher = tiny_qwen3(96, 2, vocab, seed).eval()
    with torch.no_grad():  # a random init is near-uniform; sharpen it into a confident teacher
        teacher.lm_head.weight.mul_(60.0)
    student = tiny_qwen3(64, 1, vocab, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    train = torch.randint(0, vocab, (steps, batch, seq), generator=gen)
    held_out = torch.randint(0, vocab, (batch, seq), generator=gen)
    t0 = time.perf_counter()
    cache = [teacher_topk(teacher, x, k) for x in train]  # (logprobs, ids) per step
    print(f"teacher top-{k} cache: {steps} batches in {time.perf_counter() - t0:.1f}s")

    kl_before = full_kl(teacher, student, held_out)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = sk.FusedLinearCKDLoss(tail_coef=10.0, student_topm=topm)
    t0 = time.perf_counter()
    for step, (tokens, (t_lps, t_ids)) in enumerate(zip(train, cache), 1):
        hidden = student.model(tokens).last_hidden_state
        loss = loss_fn(hidden, student.lm_head.weight, t_ids, t_lps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step:4d}  ckd loss {loss.item():.4f}")
    kl_after = full_kl(teacher, student, held_out)
    print(f"trained {steps} steps in {time.perf_counter() - t0:.1f}s; held-out "
          f"KL(teacher || student): {kl_before:.4f} -> {kl_after:.4f}")
    return {"kl_before": kl_before, "kl_after": kl_after, "final_loss": loss.item()}
