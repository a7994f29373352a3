"""BFCL v3 multi-turn categories, offline: the model talks to BFCL's simulated environments.

Mirrors the ``nvidia-bfcl`` 26.3 code named below (read from the installed package):

* Loading (``_llm_response_generation.process_multi_turn_test_case``): a sample's function
  docs are those of its ``involved_classes`` (``data/multi_turn_func_doc/``); in
  miss_func the ``missed_function`` docs are held out of the list and kept for their turn.
* Inference (``model_handler.base_handler.BaseHandler.inference_multi_turn_FC``, the path
  of function-calling models, which is what a Qwen3-format model is): each turn adds its
  user message; a held-out turn (no user message) first adds its functions to the tools
  and sends ``DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC``. Within a turn the model is
  queried step by step: a completion that does not decode, or decodes to no call, ends
  the turn; otherwise its calls run against the sample's environment instances
  (``multi_turn_utils.execute_multi_turn_func_call``, the package's own classes in
  ``func_source_code/``) and each result goes back as a tool message. After more than
  ``MAXIMUM_STEP_LIMIT`` (20) executed steps in a turn the sample is force-quit: no
  further turns, and the checker's runner fails it ("force_terminated").
* Scoring (``eval_checker.eval_runner.multi_turn_runner``): per turn, the steps that
  decode to at least one call, in order, go to BFCL's ``multi_turn_checker`` with the
  ground truth (state and execution-response checks after every turn).

Tools are shown as BFCL's FC handlers show them: the docs with the Python hint appended to
each description (``func_doc_language_specific_pre_processing``; the category is not
Java/JavaScript). BFCL's OpenAI-style handlers append it in place, so after a held-out
turn the earlier docs carry the hint twice; that artefact is not reproduced.

The environments keep their instances in ``multi_turn_utils``' module globals, keyed by
model name and sample id, and never free them; a run here uses a fresh model name and
deletes its instances when a sample is done, so a re-run or a test never sees old state.

Samples advance in lockstep: each round sends one prompt per unfinished conversation to
``generate_fn``, so a batched generate function batches across samples.
"""

from __future__ import annotations

import copy
import functools
import json
import uuid
from dataclasses import dataclass, field

from ..chat.templates import QWEN3, ChatRenderer
from .bfcl import PYTHON_HINT, _bfcl_constant, _data_dir, _read_jsonl
from .calls import to_execution_strings

MULTI_TURN_CATEGORIES = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param",
                         "multi_turn_long_context")


@functools.lru_cache(maxsize=1)
def _bfcl_multi_turn():
    _bfcl_constant()  # the package check and its message
    from bfcl.eval_checker.multi_turn_eval import multi_turn_checker, multi_turn_utils
    from bfcl.model_handler import constant
    return multi_turn_utils, multi_turn_checker, constant


def step_limit() -> int:
    return _bfcl_multi_turn()[2].MAXIMUM_STEP_LIMIT


@dataclass(frozen=True)
class MultiTurnSample:
    id: str
    category: str
    turns: list            # per turn, its user messages ([] for a held-out-function turn)
    functions: list        # docs visible from the first turn
    held_out: dict         # turn index -> docs added at that turn (miss_func)
    initial_config: dict
    involved_classes: list
    ground_truth: list     # per turn, BFCL's call strings

    def checker_entry(self) -> dict:
        return {"id": self.id, "initial_config": self.initial_config,
                "involved_classes": self.involved_classes}


@functools.cache
def _class_docs(class_name: str) -> tuple:
    file_name = _bfcl_constant().MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]
    return tuple(_read_jsonl(_data_dir() / "multi_turn_func_doc" / file_name))


@functools.cache
def _load_cached(category: str) -> tuple:
    file_name = _bfcl_constant().TEST_FILE_MAPPING[category]
    answers = {row["id"]: row["ground_truth"]
               for row in _read_jsonl(_data_dir() / "possible_answer" / file_name)}
    samples = []
    for row in _read_jsonl(_data_dir() / file_name):
        functions = [doc for name in row["involved_classes"] for doc in _class_docs(name)]
        held_out = {}
        for turn, names in row.get("missed_function", {}).items():
            held_out[int(turn)] = [doc for doc in functions if doc["name"] in names]
            functions = [doc for doc in functions if doc["name"] not in names]
        if row["id"] not in answers:
            raise ValueError(f"{row['id']}: no ground truth in possible_answer/{file_name}")
        samples.append(MultiTurnSample(
            id=row["id"], category=category, turns=row["question"], functions=functions,
            held_out=held_out, initial_config=row["initial_config"],
            involved_classes=row["involved_classes"], ground_truth=answers[row["id"]]))
    return tuple(samples)


def load_category(category: str, limit: int | None = None) -> list[MultiTurnSample]:
    """The samples of one multi-turn category in file order (shared: do not mutate)."""
    if category not in MULTI_TURN_CATEGORIES:
        raise ValueError(f"category: {category!r} is not one of {', '.join(MULTI_TURN_CATEGORIES)}")
    samples = _load_cached(category)
    return list(samples if limit is None else samples[:limit])


def prompt_tools(docs: list) -> list:
    tools = copy.deepcopy(docs)
    for tool in tools:
        tool["description"] = tool.get("description", "") + PYTHON_HINT
    return tools


# ---------------------------------------------------------------- environments

class Environment:
    """One sample's environment instances inside BFCL's executor, freed by ``close``."""

    def __init__(self, sample: MultiTurnSample, model_name: str):
        self.sample, self.model_name = sample, model_name

    def execute(self, call_strings: list) -> list[str]:
        utils = _bfcl_multi_turn()[0]
        results, _ = utils.execute_multi_turn_func_call(
            call_strings, self.sample.initial_config, self.sample.involved_classes,
            self.model_name, self.sample.id, long_context=_is_long_context(self.sample),
            is_evaL_run=False)
        return results

    def close(self):
        _free_instances(self.sample, [self.model_name])


def _is_long_context(sample) -> bool:
    return "long_context" in sample.category or "composite" in sample.category


def _instance_name(model_name: str, sample_id: str, class_name: str) -> str:
    # execute_multi_turn_func_call's naming (model name with -./ replaced by _).
    clean = model_name.replace("-", "_").replace(".", "_").replace("/", "_")
    return f"{clean}_{sample_id}_{class_name.lower()}_instance"


def _free_instances(sample, model_names):
    namespace = vars(_bfcl_multi_turn()[0])
    for model_name in model_names:
        for class_name in sample.involved_classes:
            namespace.pop(_instance_name(model_name, sample.id, class_name), None)


# ---------------------------------------------------------------- one conversation

@dataclass
class Conversation:
    """One sample's dialogue, advanced one completion at a time."""

    sample: MultiTurnSample
    chat_format: ChatRenderer
    environment: Environment
    messages: list = field(default_factory=list)
    tools: list = field(default_factory=list)
    turn: int = -1
    steps: int = 0                                      # executed steps in this turn
    completions: list = field(default_factory=list)     # per turn, per step
    decoded: list = field(default_factory=list)         # per turn, the steps' call strings
    force_quit: bool = False
    done: bool = False

    def __post_init__(self):
        self.tools = prompt_tools(self.sample.functions)
        self._next_turn()

    def _next_turn(self):
        self.turn += 1
        if self.turn == len(self.sample.turns):
            self.done = True
            return
        user_messages = self.sample.turns[self.turn]
        if self.turn in self.sample.held_out:
            if user_messages:
                raise ValueError(f"{self.sample.id}: turn {self.turn} holds out functions "
                                 "but has a user message")
            self.tools = self.tools + prompt_tools(self.sample.held_out[self.turn])
            constant = _bfcl_multi_turn()[2]
            user_messages = [{"role": "user",
                              "content": constant.DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC}]
        self.messages.extend(user_messages)
        self.steps = 0
        self.completions.append([])
        self.decoded.append([])

    def prompt(self) -> str:
        return self.chat_format.prompt(self.messages, self.tools)

    def advance(self, completion: str):
        parsed = self.chat_format.parse_turn(completion)
        self.messages.append(parsed.message)
        self.completions[-1].append(completion)
        if not parsed.calls:  # no call, or no decodable one: the turn ends
            self._next_turn()
            return
        call_strings = to_execution_strings(parsed.calls)
        results = self.environment.execute(call_strings)
        self.decoded[-1].append(call_strings)
        self.messages.extend({"role": "tool", "content": result} for result in results)
        self.steps += 1
        if self.steps > step_limit():
            self.force_quit = self.done = True


# ---------------------------------------------------------------- scoring

def score_conversation(conversation: Conversation, model_name: str) -> dict:
    """BFCL's verdict on a finished conversation (multi_turn_runner's rules)."""
    sample = conversation.sample
    row = {"id": sample.id, "category": sample.category, "completions": conversation.completions,
           "calls": conversation.decoded}
    if len(conversation.decoded) != len(sample.ground_truth):
        return {**row, "correct": False,
                "error": f"multi_turn:force_terminated after {len(conversation.decoded)} of "
                         f"{len(sample.ground_truth)} turns (more than {step_limit()} steps)"}
    checker = _bfcl_multi_turn()[1].multi_turn_checker
    checker_model = f"{model_name}_check"
    try:
        verdict = checker(conversation.decoded, sample.ground_truth, sample.checker_entry(),
                          sample.category, checker_model)
    finally:
        _free_instances(sample, [checker_model + "_eval", checker_model + "_ground_truth_eval"])
    if verdict["valid"]:
        return {**row, "correct": True, "error": None}
    detail = verdict.get("details") or {}
    detail = {key: value for key, value in detail.items() if key != "execution_result"}
    return {**row, "correct": False,
            "error": f"{verdict.get('error_type')}: {verdict.get('error_message')}",
            "error_details": json.loads(json.dumps(detail, default=str))}


def run_conversations(samples: list, generate_fn, *, chat_format: ChatRenderer = QWEN3,
                      on_done=None, progress=None) -> list[dict]:
    """Talk to every sample in lockstep; returns the scored rows in sample order.

    ``on_done(row)`` is called as each sample finishes (to save it at once);
    ``progress``: an object with ``update(n)`` (a tqdm bar) advanced per finished sample.
    """
    model_name = f"star_train_{uuid.uuid4().hex[:12]}"  # fresh instances for this run
    conversations = [Conversation(sample, chat_format, Environment(sample, model_name))
                     for sample in samples]
    rows = [None] * len(samples)
    try:
        while True:
            for index, conversation in enumerate(conversations):
                if conversation.done and rows[index] is None:
                    conversation.environment.close()
                    rows[index] = score_conversation(conversation, model_name)
                    if on_done is not None:
                        on_done(rows[index])
                    if progress is not None:
                        progress.update(1)
            active = [c for c in conversations if not c.done]
            if not active:
                return rows
            completions = list(generate_fn([c.prompt() for c in active]))
            if len(completions) != len(active):
                raise ValueError(f"generate_fn: returned {len(completions)} completions for "
                                 f"{len(active)} prompts")
            for conversation, completion in zip(active, completions):
                conversation.advance(completion)
    finally:
        for conversation in conversations:
            conversation.environment.close()
