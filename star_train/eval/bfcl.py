"""Offline BFCL v3 single-turn evaluation with the Qwen3 function-calling prompt.

Data and checker come from the ``nvidia-bfcl`` PyPI package (BFCL v3 data; its AST
checker imports only the standard library). Install it WITHOUT its dependencies, which
are the leaderboard's model clients and are not needed here::

    pip install --no-deps nvidia-bfcl

Only two of its modules are imported: ``bfcl.constant`` (data version prefix and file
names) and ``bfcl.eval_checker.ast_eval.ast_checker`` (which itself pulls in only
``bfcl.model_handler.constant`` and the Java/JavaScript type converters, all
standard-library code). The data files are read from the package's own ``data/``
folder (the ``BFCL_DATA_DIR`` environment variable that BFCL honours is ignored, so a
result always names the files it was computed from).

Prompt. A question's messages are rendered in the chat format (a
``chat.templates.ChatRenderer``; by default ``QWEN3``: ``chat.qwen3.render_prompt``) with
the question's BFCL function docs as the tools, then ``<think>\\n`` (the prompt STAR trains
on; another chat format writes the tools its own way). A BFCL doc is ``{"name",
"description", "parameters": {"type": "dict", "properties", "required"}}`` with
Python-flavoured type names ("dict", "float", "tuple", "any"). The docs keep those
names, as upstream BFCL's Qwen function-calling handler (QwenFCHandler; nvidia-bfcl
ships only the older prompting one) keeps them; the one change is the sentence " Note
that the provided function is in Python 3 syntax." appended to each description, which
BFCL adds for every model in the Python categories. The renderer prints each doc bare,
as JSON on its own line inside ``<tools>`` in the system prompt (``render_prompt``'s
default ``tool_style="bare"``: the released STAR data's and BFCL's Qwen handler's
shape, not the OpenAI ``{"type": "function", "function": doc}`` wrapping). A few
live_irrelevance questions have no functions: no tools section.

Scoring follows BFCL's runner for each kind of category:

* AST categories: the completion is parsed by the chat format (``parse_turn``; Qwen3:
  ``parse_response`` after the ``<think>\\n`` the prompt ends with); its calls become
  BFCL's decoded form ``[{name: arguments}, ...]`` and go to BFCL's ``ast_checker`` with
  the category name and language "Python", or "Java"/"JavaScript" for java and
  javascript. For those two the docs are pre-processed as BFCL's
  ``func_doc_language_specific_pre_processing`` does (mirrored: its module needs packages
  that ``--no-deps`` leaves out): the Java 8 SDK / JavaScript hint instead of the Python
  one, every parameter typed "string" with its real type in the description, since the
  values are source text that the checker's type converters read. A malformed
  completion or a text reply is wrong. Unlike BFCL's runner, a checker exception (some
  model outputs make it index into the wrong type) marks the sample wrong instead of
  stopping the run.
* irrelevance, live_irrelevance: right when no call is produced (a text reply or a
  completion that does not parse, as BFCL counts a failed decode as "no call").
* live_relevance: right when at least one well-formed call is produced.

Possible answers are paired with questions by BFCL's universal index (the id up to the
first "-"): BFCL's runner sorts both files by it and pairs them by position, and the
full ids differ in one live_multiple row.

The multi-turn categories are in ``multi_turn.py``, the executable ones in
``executable.py``; SQL and chatable are not on BFCL v3's leaderboard.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

from ..chat.templates import QWEN3, ChatRenderer
from .generation import GenerateFn, hf_generate_fn

AST_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple",
                  "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
LANGUAGE_CATEGORIES = {"java": "Java", "javascript": "JavaScript"}  # AST, non-Python
IRRELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance")
RELEVANCE_CATEGORIES = ("live_relevance",)
CATEGORIES = (AST_CATEGORIES + tuple(LANGUAGE_CATEGORIES) + IRRELEVANCE_CATEGORIES
              + RELEVANCE_CATEGORIES)

BFCL_DISTRIBUTION = "nvidia-bfcl"
BFCL_VERSION_PREFIX = "BFCL_v3"
PYTHON_HINT = " Note that the provided function is in Python 3 syntax."
# BFCL's model_handler.utils._get_language_specific_hint for the other two languages.
LANGUAGE_HINTS = {"java": " Note that the provided function is in Java 8 SDK syntax.",
                  "javascript": " Note that the provided function is in JavaScript syntax."}
# Any name works except those BFCL lists in UNDERSCORE_TO_DOT: for those its checker
# rewrites "." to "_" in function names (models whose APIs forbid dots).
CHECKER_MODEL_NAME = "star-train"



@dataclass(frozen=True)
class Sample:
    """One BFCL question: its chat messages, function docs and (AST categories) answers."""

    id: str
    category: str
    messages: list          # the single turn's messages, [{"role", "content"}, ...]
    functions: list         # BFCL function docs, exactly as shipped
    possible_answer: list | None  # BFCL "ground_truth"; None for (ir)relevance categories


# ---------------------------------------------------------------- the installed package

@functools.lru_cache(maxsize=1)
def _bfcl_constant():
    try:
        from bfcl import constant
    except ImportError as error:
        raise ImportError(f"BFCL evaluation needs the {BFCL_DISTRIBUTION!r} package: "
                          f"pip install --no-deps {BFCL_DISTRIBUTION}") from error
    if constant.VERSION_PREFIX != BFCL_VERSION_PREFIX:
        # The category list and scoring rules here are those of BFCL v3.
        raise ImportError(f"the installed bfcl package holds {constant.VERSION_PREFIX} data, "
                          f"expected {BFCL_VERSION_PREFIX} (from {BFCL_DISTRIBUTION})")
    return constant


@functools.lru_cache(maxsize=1)
def _ast_checker():
    _bfcl_constant()
    from bfcl.eval_checker.ast_eval.ast_checker import ast_checker
    return ast_checker


def _data_dir() -> Path:
    constant = _bfcl_constant()
    return Path(constant.__file__).resolve().parent / "data"


def _category_files(category) -> tuple[Path, Path | None]:
    file_name = _bfcl_constant().TEST_FILE_MAPPING[category]
    answers = _data_dir() / "possible_answer" / file_name
    has_answers = category in AST_CATEGORIES or category in LANGUAGE_CATEGORIES
    return _data_dir() / file_name, (answers if has_answers else None)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bfcl_source(categories=CATEGORIES) -> dict:
    """Where the data comes from: package, its version, BFCL data version, file hashes."""
    files = {}
    for category in _checked_categories(categories):
        for path in _category_files(category):
            if path is not None:
                files[str(path.relative_to(_data_dir()))] = _sha256(path)
    return {"package": BFCL_DISTRIBUTION,
            "package_version": importlib.metadata.version(BFCL_DISTRIBUTION),
            "data_version": _bfcl_constant().VERSION_PREFIX,
            "data_dir": str(_data_dir()),
            "files_sha256": files}


# ---------------------------------------------------------------- loading

def _universal_index(sample_id: str) -> str:
    # "live_simple_19-3-15" and "simple_19" are both identified by the part before "-".
    return sample_id.split("-", 1)[0]


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


@functools.cache
def _load_category_cached(category) -> tuple:
    questions_path, answers_path = _category_files(category)
    answers = {}
    if answers_path is not None:
        answers = {_universal_index(row["id"]): row["ground_truth"]
                   for row in _read_jsonl(answers_path)}
    samples = []
    for row in _read_jsonl(questions_path):
        if len(row["question"]) != 1:
            raise ValueError(f"{row['id']}: {len(row['question'])} turns; only single-turn "
                             "data is supported")
        answer = None
        if answers_path is not None:
            answer = answers.get(_universal_index(row["id"]))
            if answer is None:
                raise ValueError(f"{row['id']}: no possible answer in {answers_path}")
        samples.append(Sample(id=row["id"], category=category, messages=row["question"][0],
                              functions=row["function"], possible_answer=answer))
    return tuple(samples)


def load_category(category: str, limit: int | None = None) -> list[Sample]:
    """The samples of one BFCL v3 category, in file order; the first ``limit`` if given.

    Samples are cached and shared: do not mutate them.
    """
    _checked_categories([category])
    _checked_limit(limit)
    samples = _load_category_cached(category)
    return list(samples if limit is None else samples[:limit])


# ---------------------------------------------------------------- prompts

def _language_typed_parameters(properties: dict, category: str):
    # BFCL's func_doc_language_specific_pre_processing: Java/JavaScript values are source
    # text, so every parameter becomes a string and its real type moves into the description.
    language = LANGUAGE_CATEGORIES[category]
    for value in properties.values():
        if value["type"] == "any":
            value["description"] += (f" This parameter can be of any type of {language} object"
                                     " in string representation.")
        else:
            value["description"] += (f" This is {language} {value['type']} type parameter in"
                                     " string representation.")
        list_type = ("ArrayList", "Array") if category == "java" else ("array",)
        if value["type"] in list_type:
            value["description"] += (f" The list elements are of type {value['items']['type']};"
                                     " they are not in string representation.")
            del value["items"]
        if category == "javascript" and value["type"] == "dict" and "properties" in value:
            value["description"] += (" The dictionary entries have the following schema; they"
                                     " are not in string representation. "
                                     + json.dumps(value["properties"]))
            del value["properties"]
        value["type"] = "string"


def prompt_tools(functions: list, category: str | None = None) -> list:
    """The tools the model sees: BFCL's docs as its handlers pre-process them.

    The language hint goes at the end of each description (Python unless ``category`` is
    java or javascript, whose parameters are also turned into strings as BFCL does).
    """
    tools = copy.deepcopy(functions)  # samples are shared; never edit their docs
    for tool in tools:
        tool["description"] = tool.get("description", "") + LANGUAGE_HINTS.get(category,
                                                                                PYTHON_HINT)
        if category in LANGUAGE_CATEGORIES:
            _language_typed_parameters(tool["parameters"]["properties"], category)
    return tools


def build_prompt(sample: Sample, chat_format: ChatRenderer = QWEN3) -> str:
    """The question with its tools in ``chat_format`` (Qwen3: ends with ``<think>\\n``)."""
    return chat_format.prompt(sample.messages, prompt_tools(sample.functions,
                                                                  sample.category))


# ---------------------------------------------------------------- scoring

def to_bfcl_calls(calls: list) -> list:
    """Our ``[{"name", "arguments"}]`` as BFCL's decoded form ``[{name: arguments}]``."""
    return [{call["name"]: call["arguments"]} for call in calls]


def _checker_verdict(sample: Sample, calls: list) -> tuple[bool, str | None]:
    try:
        language = LANGUAGE_CATEGORIES.get(sample.category, "Python")
        verdict = _ast_checker()(sample.functions, to_bfcl_calls(calls), sample.possible_answer,
                                 language, sample.category, CHECKER_MODEL_NAME)
    except Exception as error:  # noqa: BLE001 - some outputs crash BFCL's checker: wrong answers
        return False, f"checker raised {type(error).__name__}: {error}"
    if verdict["valid"]:
        return True, None
    return False, f"{verdict.get('error_type', 'invalid')}: {verdict.get('error')}"


def score_completion(sample: Sample, completion: str, chat_format: ChatRenderer = QWEN3) -> dict:
    """Score one completion (the text generated after the prompt).

    Returns ``{"id", "category", "correct", "calls", "error", "completion"}``: ``calls``
    is what was parsed (``[{"name", "arguments"}]``, [] for a text reply, None when the
    completion does not parse), ``error`` why it is wrong (None when right).
    """
    if not isinstance(completion, str):
        raise ValueError(  # noqa: TRY004 - bad arguments are ValueErrors throughout
            f"completion for {sample.id} must be a str, got {type(completion).__name__}")
    parsed = chat_format.parse_turn(completion)
    calls = parsed.calls
    if sample.category in IRRELEVANCE_CATEGORIES:
        correct = not calls
        error = None if correct else "made a function call where none is relevant"
    elif sample.category in RELEVANCE_CATEGORIES:
        correct = bool(calls)
        error = None if correct else (f"no parseable call: {parsed.error}" if calls is None
                                      else "no function call")
    elif calls is None:
        correct, error = False, f"completion does not parse: {parsed.error}"
    else:
        correct, error = _checker_verdict(sample, calls)
    return {"id": sample.id, "category": sample.category, "correct": correct, "calls": calls,
            "error": error, "completion": completion}


# ---------------------------------------------------------------- evaluation

def _checked_categories(categories) -> list:
    if isinstance(categories, str):
        categories = [categories]
    categories = list(categories)
    if not categories:
        raise ValueError("categories: empty; choose from " + ", ".join(CATEGORIES))
    unknown = [category for category in categories if category not in CATEGORIES]
    if unknown:
        raise ValueError(f"categories: unknown {unknown}; supported: {', '.join(CATEGORIES)}")
    if len(set(categories)) != len(categories):
        raise ValueError(f"categories: listed twice in {categories}")
    return categories


def _checked_limit(limit):
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected None or an int >= 1, got {limit!r}")


def _checked_positive(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def _completions(generate_fn: GenerateFn, prompts: list) -> list:
    completions = list(generate_fn(prompts))
    if len(completions) != len(prompts):
        raise ValueError(f"generate_fn: returned {len(completions)} completions for "
                         f"{len(prompts)} prompts")
    return completions


def evaluate(model=None, tokenizer=None, categories=CATEGORIES, limit: int | None = None, *,
             max_new_tokens: int = 2048, batch_size: int = 8, generate_fn: GenerateFn | None = None,
             results_path: str | Path | None = None, chat_format: ChatRenderer = QWEN3) -> dict:
    """Run BFCL v3 single-turn categories and score them with BFCL's rules.

    (``runner.run_bfcl`` runs every category, resumably, with BFCL's overall.)
    Give either ``model`` and ``tokenizer`` (a Hugging Face causal LM and the tokenizer
    that encodes the Qwen3-format prompt text: the Qwen3 one, or a non-Qwen model's own;
    greedy decoding, ``max_new_tokens``, ``batch_size`` prompts per generate call) or
    ``generate_fn(prompts) -> completions`` (called once per category with all its
    prompts; each completion is the text after the prompt, which ends in ``<think>\\n``).
    ``limit``: only the first ``limit`` samples of each category.
    ``chat_format``: how prompts are written and completions read (default: the Qwen3
    format; ``runtime.models.model_renderer`` gives a model config's).
    ``results_path``: also write one JSON line per sample (see ``score_completion``).

    Returns ``{"source": bfcl_source(...), "categories": {name: {"accuracy", "correct",
    "total"}}, "overall_accuracy": unweighted mean of the category accuracies,
    "total": samples scored}``.
    """
    categories = _checked_categories(categories)
    _checked_limit(limit)
    _checked_positive("max_new_tokens", max_new_tokens)
    _checked_positive("batch_size", batch_size)
    if generate_fn is None:
        if model is None or tokenizer is None:
            raise ValueError("model, tokenizer: both are needed unless generate_fn is given")
        generate_fn = hf_generate_fn(model, tokenizer, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, stop_tokens=chat_format.stop_tokens)
    elif model is not None or tokenizer is not None:
        raise ValueError("generate_fn: give either generate_fn or model and tokenizer, not both")

    source = bfcl_source(categories)
    results_file = None
    if results_path is not None:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        results_file = open(results_path, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    per_category = {}
    try:
        for category in categories:
            samples = load_category(category, limit)
            completions = _completions(generate_fn, [build_prompt(sample, chat_format)
                                                     for sample in samples])
            scored = [score_completion(sample, completion, chat_format)
                      for sample, completion in zip(samples, completions)]
            correct = sum(row["correct"] for row in scored)
            per_category[category] = {"accuracy": correct / len(scored), "correct": correct,
                                      "total": len(scored)}
            if results_file is not None:
                results_file.writelines(json.dumps(row, ensure_ascii=False) + "\n"
                                        for row in scored)
                results_file.flush()  # a long run leaves the finished categories on disk
    finally:
        if results_file is not None:
            results_file.close()
    accuracies = [scores["accuracy"] for scores in per_category.values()]
    return {"source": source, "categories": per_category,
            "overall_accuracy": sum(accuracies) / len(accuracies),
            "total": sum(scores["total"] for scores in per_category.values())}
