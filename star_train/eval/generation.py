"""Greedy, batched Hugging Face generation behind the evaluator's ``generate_fn(prompts)``."""

from __future__ import annotations

from collections.abc import Callable

from ..chat.qwen3 import END_TOKENS

# prompts -> completions (the text after each prompt), in order.
GenerateFn = Callable[[list], list]


def hf_generate_fn(model, tokenizer, *, max_new_tokens: int, batch_size: int,
                   stop_tokens=END_TOKENS) -> GenerateFn:
    """Greedy, batched, left-padded ``model.generate``; returns completions without end tokens.

    ``stop_tokens``: the tokens that end a completion (a chat format's ``stop_tokens``;
    default the Qwen3 ones); those the tokenizer lacks are skipped, and with none left the
    tokenizer's eos token is used.

    Prompts are sorted by length before batching so that a batch pads little; results come
    back in the given order. The tokenizer is only read (the offline Qwen3 tokenizer is a
    shared object), so padding is done here rather than by setting its padding side.
    """
    import torch

    # A tokenizer lacking an end token maps it to None or to its unknown token: skip those.
    end_ids = [tokenizer.convert_tokens_to_ids(token) for token in stop_tokens]
    end_ids = [i for token, i in zip(stop_tokens, end_ids)
               if i is not None and tokenizer.convert_ids_to_tokens(i) == token]
    end_ids = end_ids or [tokenizer.eos_token_id]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[-1]
    device = next(model.parameters()).device

    def left_padded(rows: list) -> tuple:
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, width - len(row):] = 1
        return input_ids.to(device), attention_mask.to(device)

    def completion_text(new_ids: list) -> str:
        for position, token_id in enumerate(new_ids):
            if token_id in end_ids:
                new_ids = new_ids[:position]
                break
        return tokenizer.decode(new_ids, skip_special_tokens=False)

    def generate(prompts: list) -> list:
        encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
        order = sorted(range(len(prompts)), key=lambda index: len(encoded[index]))
        completions = [None] * len(prompts)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                input_ids, attention_mask = left_padded([encoded[index] for index in batch])
                with torch.inference_mode():
                    output = model.generate(
                        input_ids=input_ids, attention_mask=attention_mask,
                        max_new_tokens=max_new_tokens, do_sample=False,
                        # Local checkpoints carry sampling defaults (Qwen3: T=0.6, top-k 20);
                        # greedy decoding ignores them, so drop them to keep generate quiet.
                        temperature=None, top_p=None, top_k=None,
                        eos_token_id=end_ids, pad_token_id=pad_id)
                for index, row in zip(batch, output[:, input_ids.shape[1]:].tolist()):
                    completions[index] = completion_text(row)
        finally:
            model.train(was_training)
        return completions

    return generate
