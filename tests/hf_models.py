"""Tiny causal LMs of each family the HF integration supports, built from configs (no downloads)."""

import torch
import transformers

VOCAB = 301
FAMILIES = ("qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3")


def tiny(family, seed=0, tie=None, sharpen=20.0):
    """A 2-layer model of ``family`` in fp32 train mode, with sharper logits than the default init.

    Gemma2 gets ``final_logit_softcapping=None`` (its default of 30 transforms the
    logits after lm_head, which the fused ops refuse); use ``softcapped_gemma2`` for that.
    """
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64}
    if family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = transformers.Qwen3Config(head_dim=8, **common), transformers.Qwen3ForCausalLM
    elif family == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg, cls = transformers.MistralConfig(**common), transformers.MistralForCausalLM
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(head_dim=8, final_logit_softcapping=None, **common)
        cls = transformers.Gemma2ForCausalLM
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(head_dim=8, sliding_window=4, **common)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    cfg.tie_word_embeddings = family in ("qwen3", "gemma2", "gemma3") if tie is None else tie
    model = cls(cfg).float().train()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def softcapped_gemma2():
    model = tiny("gemma2")
    model.config.final_logit_softcapping = 30.0
    return model


def batch(seed=0, batch_size=3, seq_len=11, vocab=VOCAB):
    """input_ids, attention_mask (row 1 right-padded) and a [B, T] response mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    attn = torch.ones(batch_size, seq_len, dtype=torch.long)
    attn[1, 8:] = 0
    loss_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    loss_mask[:, 4:] = True
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)
