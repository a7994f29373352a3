"""Tokenized CKD examples: the released messages_to_trainset format, checked against the
real Qwen3 template through transformers' jinja machinery; the released truncation and
end-of-turn handling; which target tokens ckd.mask trains."""

from pathlib import Path

import pytest

from star_train.chat.qwen3 import THINK_CLOSE_TAG
from star_train.data.examples import IGNORE, load_examples, released_pair
from star_train.data.records import load_records
from train_fixtures import weather_records, write_jsonl

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_released_pair_is_messages_to_trainset_on_the_real_template():
    """messages_to_trainset.py: prompt = template(messages[:-1], tools, generation prompt)
    + "<think>"; target = template(messages[-1:]) minus the assistant header, "</think>"
    put in front; with --add-reasoning-content the reasoning goes before it."""
    chat = pytest.importorskip("transformers.utils.chat_template_utils")
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data folder missing: {DATA_DIR}")
    template = (DATA_DIR / "qwen3_chat_template.jinja").read_text(encoding="utf-8")

    def render(messages, tools=None, **kwargs):
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return chat.render_jinja_template(conversations=[messages], tools=tools or None,
                                          chat_template=template, **kwargs)[0][0]

    for record in load_records(DATA_DIR / "star_example_messages.jsonl")[:200]:
        messages = record["messages"]
        want_prompt = render(messages[:-1], record["tools"], add_generation_prompt=True) + "<think>"
        truth = render(messages[-1:]).replace("<|im_start|>assistant\n", "")
        if truth.startswith("<think>"):
            truth = truth[7:]
        if "</think>" not in truth:
            truth = "</think>" + truth
        assert released_pair(record) == (want_prompt, truth), record["id"]
        reasoning = messages[-1].get("reasoning_content")
        with_reasoning = (reasoning + truth) if reasoning else truth
        assert released_pair(record, add_reasoning=True)[1] == with_reasoning, record["id"]


def test_released_truncation_and_end_of_turn(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", weather_records())
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    full = load_examples(path, tokenizer, fmt="released")
    for ex, record in zip(full, weather_records()):
        prompt, target = released_pair(record)
        p, t = tokenizer.encode(prompt), tokenizer.encode(target)
        assert ex.input_ids.tolist() == p + t + [eos]  # ends "<|im_end|>\n<|im_end|>"
        assert (ex.labels != IGNORE).sum() == len(t) + 1
    cut = load_examples(path, tokenizer, fmt="released", max_prompt_length=7,
                        max_response_length=5)
    for ex in cut:
        assert len(ex.input_ids) == 7 + 5 + 1 and int(ex.input_ids[-1]) == eos
        assert ex.labels[:7].tolist() == [IGNORE] * 7


@pytest.mark.parametrize("fmt", ["released", "template"])
def test_ckd_mask_splits_the_target_at_the_last_think_close(tmp_path, tokenizer, fmt):
    path = write_jsonl(tmp_path / "rows.jsonl", weather_records())
    close = tokenizer.convert_tokens_to_ids(THINK_CLOSE_TAG)
    kwargs = dict(fmt=fmt, add_reasoning=True, max_length=400)
    every = load_examples(path, tokenizer, mask="all", **kwargs)
    think = load_examples(path, tokenizer, mask="think", **kwargs)
    answer = load_examples(path, tokenizer, mask="answer", **kwargs)
    alter = load_examples(path, tokenizer, mask="alter", **kwargs)
    for i, (a, t, n, x) in enumerate(zip(every, think, answer, alter)):
        targets = (a.labels != IGNORE).nonzero().squeeze(1).tolist()
        cut = max(j for j in targets if int(a.input_ids[j]) == close) + 1
        assert (t.labels != IGNORE).nonzero().squeeze(1).tolist() == [j for j in targets if j < cut]
        assert (n.labels != IGNORE).nonzero().squeeze(1).tolist() == [j for j in targets if j >= cut]
        assert x.labels.tolist() == (t if i % 2 == 0 else n).labels.tolist()
