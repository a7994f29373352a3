"""Offline BFCL v3 evaluation: data loading, prompts, BFCL's scoring rules, HF generation."""

import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch

from bfcl_answers import completion_for_calls, first_possible_answer
from star_train.chat.qwen3 import THINK_OPEN
from star_train.eval import bfcl

MAIN_AST = ("simple", "multiple", "parallel", "parallel_multiple")

# Possible answers in nvidia-bfcl 26.3's BFCL v3 data that no output can meet under the
# checker's rules (see bfcl_answers.first_possible_answer): two answers with a parameter whose
# allowed-value list is empty, two with an answer parameter the function doc lacks.
NO_PASSING_OUTPUT = {"live_simple_106-63-0", "live_simple_112-68-0",
                     "live_multiple_862-181-3", "live_multiple_964-207-0"}
TEXT_REPLY = ("The user asks something none of the tools can do.\n</think>\n\n"
              "I can't help with that.<|im_end|>")


def positional_generate_fn(samples, completions):
    """A generate_fn answering each prompt of ``samples`` (in order) with ``completions``."""
    expected_prompts = [bfcl.build_prompt(sample) for sample in samples]

    def generate(prompts):
        assert prompts == expected_prompts
        return list(completions)
    return generate


def evaluate_with(category, completions_for, tmp_path, limit=None):
    """evaluate() on one category with completions_for(sample) -> str; returns (result, rows)."""
    samples = bfcl.load_category(category, limit)
    path = tmp_path / f"{category}.jsonl"
    result = bfcl.evaluate(categories=[category], limit=limit, results_path=path,
                           generate_fn=positional_generate_fn(samples, map(completions_for, samples)))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["id"] for row in rows] == [sample.id for sample in samples]
    return result, rows


def ground_truth_completion(sample):
    calls = first_possible_answer(sample)
    return TEXT_REPLY if calls is None else completion_for_calls(calls, "Use the tools.")


# ---------------------------------------------------------------- data and prompts

def test_categories_load_with_their_answers():
    expected_sizes = {"simple": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200,
                      "live_simple": 258, "live_multiple": 1053, "live_parallel": 16,
                      "live_parallel_multiple": 24, "java": 100, "javascript": 50,
                      "irrelevance": 240, "live_irrelevance": 882, "live_relevance": 18}
    assert set(expected_sizes) == set(bfcl.CATEGORIES)
    for category, size in expected_sizes.items():
        samples = bfcl.load_category(category)
        assert len(samples) == size
        assert all(s.category == category and s.messages[-1]["role"] == "user" for s in samples)
        # Four live_irrelevance questions come without any function: the prompt has no tools.
        assert sum(not s.functions for s in samples) == (4 if category == "live_irrelevance" else 0)
        has_answers = category in bfcl.AST_CATEGORIES or category in bfcl.LANGUAGE_CATEGORIES
        assert all((s.possible_answer is not None) == has_answers for s in samples)
    assert [s.id for s in bfcl.load_category("simple", limit=3)] == ["simple_0", "simple_1", "simple_2"]
    # The one row whose answer id differs from its question id is paired by universal index.
    last = bfcl.load_category("live_multiple")[-1]
    assert last.id == "live_multiple_1052-79-0" and list(last.possible_answer[0]) == ["set_volume"]


def test_source_names_package_version_and_files():
    source = bfcl.bfcl_source(["simple", "irrelevance"])
    assert source["package"] == "nvidia-bfcl"
    assert source["package_version"] == importlib.metadata.version("nvidia-bfcl")
    assert source["data_version"] == "BFCL_v3"
    assert set(source["files_sha256"]) == {"BFCL_v3_simple.json", "possible_answer/BFCL_v3_simple.json",
                                           "BFCL_v3_irrelevance.json"}
    assert all(len(digest) == 64 for digest in source["files_sha256"].values())


def test_prompt_shows_bfcl_docs_as_qwen3_tools():
    sample = bfcl.load_category("live_simple")[0]
    description = sample.functions[0]["description"]
    prompt = bfcl.build_prompt(sample)
    assert prompt.startswith("<|im_start|>system\n")
    question_end = sample.messages[-1]["content"] + "<|im_end|>\n"
    assert prompt.endswith(question_end + "<|im_start|>assistant\n" + THINK_OPEN)
    tool_lines = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].split("\n")
    tools = [json.loads(line) for line in tool_lines]
    assert len(tools) == len(sample.functions)  # the docs as shipped, no OpenAI wrapper
    shown = tools[0]
    assert shown["name"] == sample.functions[0]["name"] and "function" not in shown
    assert shown["description"] == description + bfcl.PYTHON_HINT
    assert shown["parameters"] == sample.functions[0]["parameters"]  # BFCL types ("dict", ...) as shipped
    assert sample.functions[0]["description"] == description  # the shared sample is not edited


def test_checker_imports_only_the_standard_library():
    # `pip install --no-deps nvidia-bfcl` must be enough: loading the data and the checker
    # may import bfcl's own modules and the standard library, nothing else.
    code = ("import sys, json; import star_train.eval.bfcl as b; before = set(sys.modules); "
            "b._ast_checker(); b.bfcl_source(); b.load_category('simple'); "
            "print(json.dumps(sorted(m for m in set(sys.modules) - before "
            "if m.split('.')[0] not in sys.stdlib_module_names)))")
    new_modules = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                            text=True, check=True).stdout)
    assert new_modules and all(module == "bfcl" or module.startswith("bfcl.") for module in new_modules)


# ---------------------------------------------------------------- scoring: ground truth

@pytest.mark.parametrize("category", bfcl.AST_CATEGORIES)
def test_first_possible_answer_scores_every_answerable_sample(category, tmp_path):
    result, rows = evaluate_with(category, ground_truth_completion, tmp_path)
    samples = bfcl.load_category(category)
    unanswerable = {s.id for s in samples if first_possible_answer(s) is None}
    assert unanswerable == {i for i in NO_PASSING_OUTPUT if i.startswith(category + "_")}
    assert [row["id"] for row in rows if not row["correct"]] == sorted(
        unanswerable, key=[s.id for s in samples].index)
    scores = result["categories"][category]
    assert scores == {"accuracy": (len(samples) - len(unanswerable)) / len(samples),
                      "correct": len(samples) - len(unanswerable), "total": len(samples)}
    if category in MAIN_AST:
        assert scores["accuracy"] == 1.0
    assert result["overall_accuracy"] == scores["accuracy"] and result["total"] == len(samples)


def test_answers_that_no_output_can_meet_stay_wrong():
    # The closest output (every answer parameter with its first value) still fails.
    for category in ("live_simple", "live_multiple"):
        for sample in bfcl.load_category(category):
            if sample.id not in NO_PASSING_OUTPUT:
                continue
            (name, allowed_by_param), = sample.possible_answer[0].items()
            arguments = {param: ([v for v in allowed if v != ""] or [[]])[0]
                         for param, allowed in allowed_by_param.items()}
            completion = completion_for_calls([{"name": name, "arguments": arguments}])
            assert not bfcl.score_completion(sample, completion)["correct"]


@pytest.mark.parametrize("category", bfcl.IRRELEVANCE_CATEGORIES)
def test_irrelevance_is_right_without_a_call(category, tmp_path):
    result, _ = evaluate_with(category, lambda sample: TEXT_REPLY, tmp_path)
    assert result["categories"][category]["accuracy"] == 1.0

    def a_call(sample):
        name = sample.functions[0]["name"] if sample.functions else "search"  # an unknown tool counts too
        return completion_for_calls([{"name": name, "arguments": {}}])
    result, rows = evaluate_with(category, a_call, tmp_path)
    assert result["categories"][category]["accuracy"] == 0.0
    assert all(row["error"] == "made a function call where none is relevant" for row in rows)

    # As in BFCL, an output that does not decode is "no call": right for irrelevance.
    sample = bfcl.load_category(category, limit=1)[0]
    broken_call = "thinking...\n</think>\n\n<tool_call>\n{not json\n</tool_call>"
    assert bfcl.score_completion(sample, broken_call)["correct"]
    assert bfcl.score_completion(sample, "still thinking when the tokens ran out")["correct"]


def test_relevance_is_right_with_a_call(tmp_path):
    def a_call(sample):
        return completion_for_calls([{"name": sample.functions[0]["name"], "arguments": {"x": 1}}])
    result, _ = evaluate_with("live_relevance", a_call, tmp_path)
    assert result["categories"]["live_relevance"]["accuracy"] == 1.0
    result, rows = evaluate_with("live_relevance", lambda sample: TEXT_REPLY, tmp_path)
    assert result["categories"]["live_relevance"]["accuracy"] == 0.0
    assert rows[0]["calls"] == [] and rows[0]["error"] == "no function call"


# ---------------------------------------------------------------- scoring: corrupted answers

def _wrong_value(value, allowed):
    """A value of the same kind that the checker cannot accept, or None if there is none."""
    if isinstance(value, bool):
        candidate = not value
    elif isinstance(value, str):
        candidate = "zzz not an answer"
    elif isinstance(value, int):
        candidate = 987_654_321
    elif isinstance(value, float):
        candidate = 98_765.4321
    else:
        return None
    return None if candidate in allowed else candidate


def _first_call_required_params(sample, calls):
    doc = next(d for d in sample.functions if d["name"] == calls[0]["name"])
    return [p for p in doc["parameters"].get("required", []) if p in calls[0]["arguments"]]


def _wrong_name(sample, calls):
    calls[0]["name"] += "_v2"
    return calls


def _wrong_required_value(sample, calls):
    allowed_by_param = next(iter(sample.possible_answer[0].values()))
    for param in _first_call_required_params(sample, calls):
        wrong = _wrong_value(calls[0]["arguments"][param], allowed_by_param[param])
        if wrong is not None:
            calls[0]["arguments"][param] = wrong
            return calls
    return None


def _missing_required(sample, calls):
    required = _first_call_required_params(sample, calls)
    if not required:
        return None
    del calls[0]["arguments"][required[0]]
    return calls


@pytest.mark.parametrize("corrupt", [_wrong_name, _wrong_required_value, _missing_required])
@pytest.mark.parametrize("category", MAIN_AST)
def test_corrupted_answers_score_zero(category, corrupt, tmp_path):
    corrupted = 0

    def completion(sample):
        nonlocal corrupted
        calls = corrupt(sample, first_possible_answer(sample))
        if calls is None:  # nothing to corrupt this way: a text reply, also wrong
            return TEXT_REPLY
        corrupted += 1
        return completion_for_calls(calls)
    result, rows = evaluate_with(category, completion, tmp_path)
    assert result["categories"][category]["accuracy"] == 0.0
    assert corrupted >= 0.75 * len(rows)  # most samples were really corrupted, not skipped


# ---------------------------------------------------------------- end to end with a model

@pytest.fixture(scope="module")
def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from star_train.chat.tokenizer import QWEN3_VOCAB_SIZE, qwen3_tokenizer

    config = Qwen3Config(vocab_size=QWEN3_VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # sharpen the near-uniform random head: clear argmaxes
    return model, qwen3_tokenizer()


def test_evaluate_end_to_end_with_a_tiny_qwen3(tiny_qwen3, tmp_path):
    model, tokenizer = tiny_qwen3
    categories = ["simple", "parallel_multiple", "irrelevance", "live_relevance"]
    path = tmp_path / "results.jsonl"
    padding_side = tokenizer.padding_side
    result = bfcl.evaluate(model, tokenizer, categories, limit=3, max_new_tokens=6, batch_size=2,
                           results_path=path)
    assert tokenizer.padding_side == padding_side  # the shared tokenizer is left alone
    assert list(result["categories"]) == categories
    for scores in result["categories"].values():
        assert scores["total"] == 3 and 0 <= scores["correct"] <= 3
        assert 0.0 <= scores["accuracy"] <= 1.0 and scores["accuracy"] == scores["correct"] / 3
    accuracies = [scores["accuracy"] for scores in result["categories"].values()]
    assert result["overall_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert result["total"] == 12 and result["source"]["data_version"] == "BFCL_v3"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 12 and all(isinstance(row["completion"], str) for row in rows)
    assert model.training  # a freshly built model is in training mode; evaluate restores it


class ScriptedLM(torch.nn.Module):
    """Stands in for a causal LM: 'generates' a set completion per prompt, <|im_end|>, then padding."""

    def __init__(self, tokenizer, completion_for_prompt):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives generate_fn a device
        self.tokenizer, self.completion_for_prompt = tokenizer, completion_for_prompt

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **options):
        assert options["do_sample"] is False and not self.training
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            assert mask == sorted(mask)  # left padding: the padding comes first
            assert all(token == pad_token_id for token, real in zip(ids, mask) if not real)
            prompt = self.tokenizer.decode([token for token, real in zip(ids, mask) if real])
            completion = self.completion_for_prompt[prompt]
            new = self.tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos_token_id[0]]
            rows.append(ids + new[:max_new_tokens])
        width = max(len(row) for row in rows)
        return torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])


def test_generation_path_decodes_cuts_and_keeps_order(tmp_path):
    # Through hf_generate_fn with a scripted model: prompts sorted by length and batched,
    # completions cut at <|im_end|>, decoded and handed back to the right samples.
    from star_train.chat.tokenizer import qwen3_tokenizer

    tokenizer = qwen3_tokenizer()
    samples = bfcl.load_category("live_simple", limit=7)
    completions = {bfcl.build_prompt(s): ground_truth_completion(s).removesuffix("<|im_end|>")
                   for s in samples}
    model = ScriptedLM(tokenizer, completions)
    path = tmp_path / "scripted.jsonl"
    result = bfcl.evaluate(model, tokenizer, ["live_simple"], limit=7, batch_size=3, results_path=path)
    assert result["categories"]["live_simple"] == {"accuracy": 1.0, "correct": 7, "total": 7}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["completion"] for row in rows] == [completions[bfcl.build_prompt(s)] for s in samples]
    assert model.training  # restored after generation
    truncated = bfcl.evaluate(model, tokenizer, ["live_simple"], limit=7, max_new_tokens=12, batch_size=3)
    assert truncated["categories"]["live_simple"]["accuracy"] == 0.0


def test_batched_greedy_generation_matches_one_prompt_at_a_time(tiny_qwen3):
    # Left padding with an attention mask must not change what each prompt generates.
    model, tokenizer = tiny_qwen3
    prompts = [bfcl.build_prompt(sample) for sample in bfcl.load_category("live_simple", limit=3)]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) == 3  # different lengths: padding
    batched = bfcl.hf_generate_fn(model, tokenizer, max_new_tokens=5, batch_size=3)(prompts)
    single = bfcl.hf_generate_fn(model, tokenizer, max_new_tokens=5, batch_size=1)(prompts)
    assert batched == single and all(completion for completion in batched)


# ---------------------------------------------------------------- bad inputs

def _text_replies(prompts):
    return [TEXT_REPLY] * len(prompts)


@pytest.mark.parametrize("kwargs, argument", [
    ({"categories": ["simple", "exec_simple"]}, "categories"),
    ({"categories": "multi_turn_base"}, "categories"),
    ({"categories": []}, "categories"),
    ({"categories": ["simple", "simple"]}, "categories"),
    ({"limit": 0}, "limit"),
    ({"limit": -2}, "limit"),
    ({"limit": 1.5}, "limit"),
    ({"limit": True}, "limit"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments_raise_naming_them(kwargs, argument):
    arguments = {"categories": ["simple"], "generate_fn": _text_replies, **kwargs}
    with pytest.raises(ValueError, match=argument):
        bfcl.evaluate(**arguments)


def test_model_or_generate_fn_is_required_and_checked():
    with pytest.raises(ValueError, match="model, tokenizer"):
        bfcl.evaluate(categories=["simple"], limit=1)
    with pytest.raises(ValueError, match="generate_fn"):
        bfcl.evaluate(object(), object(), ["simple"], limit=1, generate_fn=_text_replies)
    with pytest.raises(ValueError, match="generate_fn"):
        bfcl.evaluate(categories=["simple"], limit=2, generate_fn=lambda prompts: [TEXT_REPLY])
    with pytest.raises(ValueError, match="completion"):
        bfcl.evaluate(categories=["simple"], limit=1, generate_fn=lambda prompts: [None])
    with pytest.raises(ValueError, match="limit"):
        bfcl.load_category("simple", limit=0)
    with pytest.raises(ValueError, match="categories"):
        bfcl.load_category("sql")


def test_cli_eval_on_a_local_model_folder(tiny_qwen3, tmp_path, capsys):
    from star_train import cli

    model, _ = tiny_qwen3
    model.save_pretrained(tmp_path / "model")
    summary_path = tmp_path / "summary.json"
    assert cli.main(["eval", "--model", str(tmp_path / "model"), "--categories",
                     "simple,irrelevance", "--limit", "2", "--max-new-tokens", "4",
                     "--dtype", "float32", "--device", "cpu", "--out", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert {k: v["total"] for k, v in summary["categories"].items()} == {"simple": 2,
                                                                         "irrelevance": 2}
    out = capsys.readouterr().out
    assert "BFCL v3 overall" in out and "not run (counted 0): " in out
    assert summary["overall"]["missing"] == [c for c in summary["overall"]["sizes"]
                                             if c not in ("simple", "irrelevance")]
