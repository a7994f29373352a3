"""BFCL v3 executable categories, offline where the functions allow it.

The four ``exec_*`` categories call the Python functions in ``nvidia-bfcl``'s
``eval_checker/executable_eval/data/executable_python_function.py`` and compare what the
model's calls return with what the ground-truth calls return. Some of those functions are
pure computations; others send HTTP requests to web APIs (weather, currency, stock
prices, ...). Which ones is read from that file's source: a function needs the network
when its body uses ``requests`` or the API keys, or calls a function that does.

A sample is **not evaluated**, never counted right or wrong, when
* a ground-truth call needs the network (its expected result cannot be computed), or
* the model's output calls a function that needs the network (its result cannot be).
Such samples are not generated for when the first rule already applies. ``rest`` (every
call is a ``requests.get`` to a web API, checked against the live response) is not
evaluated at all.

Scoring mirrors ``eval_checker.eval_runner.executable_file_runner`` (26.3): the calls are
turned into call strings as BFCL's function-calling handlers do (``calls.py``); an output
that does not decode or makes no call is wrong; otherwise BFCL's
``executable_checker_non_rest`` runs them against the expected results, which are the
ground-truth calls' results (``eval_runner_helper.get_executable_expected_output``).
The prompt is the single-turn AST prompt: BFCL's docs with the Python hint.

Each model call gets ``CALL_TIME_LIMIT_S`` seconds (main thread only; BFCL has no limit):
a model can ask for ``math_factorial(10**9)``; running out of time is an execution
error, i.e. a wrong answer, as any other failing call.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from ..chat.templates import QWEN3, ChatRenderer
from .bfcl import _bfcl_constant, _data_dir, _read_jsonl, prompt_tools
from .calls import to_execution_strings

EXEC_CATEGORIES = ("exec_simple", "exec_multiple", "exec_parallel", "exec_parallel_multiple")
REST_CATEGORY = "rest"
CALL_TIME_LIMIT_S = 10.0
_FUNCTIONS_MODULE = "bfcl.eval_checker.executable_eval.data.executable_python_function"


@dataclass(frozen=True)
class ExecSample:
    id: str
    category: str
    messages: list
    functions: list
    ground_truth: list        # BFCL call strings ([] for rest)
    result_types: list        # "exact_match" / "real_time_match" / "structural_match"
    not_evaluated: str | None  # why it cannot be evaluated offline, None when it can


def _functions_path() -> Path:
    return (Path(_bfcl_constant().__file__).resolve().parent / "eval_checker"
            / "executable_eval" / "data" / "executable_python_function.py")


@functools.lru_cache(maxsize=1)
def network_functions() -> frozenset:
    """Names of the executable functions that need the network (directly or via a call)."""
    tree = ast.parse(_functions_path().read_text(encoding="utf-8"))
    bodies = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    names_used = {name: {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                  for name, node in bodies.items()}
    needs = {name for name, used in names_used.items() if used & {"requests", "api_key"}}
    while True:
        more = {name for name, used in names_used.items() if used & needs} - needs
        if not more:
            return frozenset(needs)
        needs |= more


def _called_name(call_string: str) -> str:
    return call_string.split("(", 1)[0].strip()


def _network_reason(call_strings: list, who: str) -> str | None:
    network = sorted({_called_name(s) for s in call_strings} & network_functions())
    return f"{who} calls {', '.join(network)}, which needs the network" if network else None


@functools.cache
def _load_cached(category: str) -> tuple:
    rows = _read_jsonl(_data_dir() / _bfcl_constant().TEST_FILE_MAPPING[category])
    samples = []
    for row in rows:
        if len(row["question"]) != 1:
            raise ValueError(f"{row['id']}: {len(row['question'])} turns; expected one")
        if category == REST_CATEGORY:
            ground_truth, types = [], []
            reason = "rest: every call is an HTTP request checked against a live web API"
        else:
            ground_truth, types = row["ground_truth"], row["execution_result_type"]
            reason = _network_reason(ground_truth, "the ground truth")
        samples.append(ExecSample(id=row["id"], category=category, messages=row["question"][0],
                                  functions=row["function"], ground_truth=ground_truth,
                                  result_types=types, not_evaluated=reason))
    return tuple(samples)


def load_category(category: str, limit: int | None = None) -> list[ExecSample]:
    if category not in EXEC_CATEGORIES + (REST_CATEGORY,):
        raise ValueError(f"category: {category!r} is not an executable category")
    samples = _load_cached(category)
    return list(samples if limit is None else samples[:limit])


def build_prompt(sample: ExecSample, chat_format: ChatRenderer = QWEN3) -> str:
    return chat_format.prompt(sample.messages, prompt_tools(sample.functions))


# ---------------------------------------------------------------- running calls

@contextlib.contextmanager
def _time_limit(seconds: float):
    # SIGALRM only reaches the main thread; elsewhere calls run without a limit.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"call ran longer than {seconds:g} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@functools.lru_cache(maxsize=1)
def _checker():
    _bfcl_constant()
    from bfcl.eval_checker.executable_eval import executable_checker
    return executable_checker


@functools.cache
def expected_results(sample_id: str, category: str) -> tuple:
    """The ground-truth calls' results, as BFCL's get_executable_expected_output runs them."""
    sample = next(s for s in _load_cached(category) if s.id == sample_id)
    if sample.not_evaluated:
        raise ValueError(f"{sample.id}: {sample.not_evaluated}")
    results = []
    for call in sample.ground_truth:
        namespace = {}
        # BFCL's own ground-truth strings, run as its get_executable_expected_output runs them.
        exec(f"from {_FUNCTIONS_MODULE} import *\nresult={call}", namespace)  # noqa: S102
        results.append(namespace["result"])
    return tuple(results)


def score_completion(sample: ExecSample, completion: str,
                     chat_format: ChatRenderer = QWEN3) -> dict:
    """``{"id", "category", "correct", "not_evaluated", "calls", "error", "completion"}``.

    ``correct`` is None when the sample is not evaluated (``not_evaluated`` says why).
    """
    row = {"id": sample.id, "category": sample.category, "correct": None,
           "not_evaluated": sample.not_evaluated, "calls": None, "error": None,
           "completion": completion}
    if sample.not_evaluated:
        return row
    parsed = chat_format.parse_turn(completion)
    if parsed.calls is None:
        return {**row, "correct": False,
                "error": f"executable_decoder:decoder_failed: {parsed.error}"}
    call_strings = to_execution_strings(parsed.calls)
    row["calls"] = call_strings
    if not call_strings:
        return {**row, "correct": False, "error": "executable_decoder:wrong_output_format: "
                                                  "no function call"}
    reason = _network_reason(call_strings, "the model's output")
    if reason:
        return {**row, "not_evaluated": reason}
    prompt_item = {"execution_result": list(expected_results(sample.id, sample.category)),
                   "execution_result_type": sample.result_types}
    with _time_limit(CALL_TIME_LIMIT_S * len(call_strings)):
        verdict = _checker().executable_checker_non_rest(call_strings, prompt_item,
                                                         sample.category)
    if verdict["valid"]:
        return {**row, "correct": True}
    return {**row, "correct": False,
            "error": f"{verdict.get('error_type')}: {verdict.get('error')}"[:2000]}
