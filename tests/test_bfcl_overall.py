"""BFCL v3's overall score: the leaderboard formula, by hand and against BFCL's own helpers."""

import ast
import math
from pathlib import Path

import pytest

from star_train.eval import overall, runner

SIZES = {"simple": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200,
         "java": 100, "javascript": 50, "exec_simple": 100, "exec_multiple": 50,
         "exec_parallel": 50, "exec_parallel_multiple": 40, "rest": 70, "irrelevance": 240,
         "live_simple": 258, "live_multiple": 1053, "live_parallel": 16,
         "live_parallel_multiple": 24, "live_irrelevance": 882, "live_relevance": 18,
         "multi_turn_base": 200, "multi_turn_miss_func": 200, "multi_turn_miss_param": 200,
         "multi_turn_long_context": 200}
SCORES = {"simple": 0.9, "multiple": 0.8, "parallel": 0.7, "parallel_multiple": 0.6,
          "java": 0.5, "javascript": 0.4, "exec_simple": 0.8, "exec_multiple": 0.6,
          "exec_parallel": 0.5, "exec_parallel_multiple": 0.4, "rest": 0.2,
          "irrelevance": 0.3, "live_simple": 0.7, "live_multiple": 0.6, "live_parallel": 0.5,
          "live_parallel_multiple": 0.4, "live_irrelevance": 0.8, "live_relevance": 0.9,
          "multi_turn_base": 0.4, "multi_turn_miss_func": 0.2, "multi_turn_miss_param": 0.3,
          "multi_turn_long_context": 0.1}


def test_category_sizes_are_the_packaged_data():
    assert {c: runner.category_size(c) for c in overall.LEADERBOARD_CATEGORIES} == SIZES


def test_overall_by_hand():
    result = overall.leaderboard_overall(SCORES, SIZES)
    simple = (0.9 + 0.5 + 0.4) / 3                  # Python, Java, JavaScript simple: 0.6
    exec_simple = (0.8 + 0.2) / 2                    # exec_simple and rest: 0.5
    non_live = (simple + 0.8 + 0.7 + 0.6 + exec_simple + 0.6 + 0.5 + 0.4 + 0.3) / 9  # 0.555...
    live = (0.7 * 258 + 0.6 * 1053 + 0.5 * 16 + 0.4 * 24 + 0.8 * 882 + 0.9 * 18) / 2251
    multi_turn = (0.4 + 0.2 + 0.3 + 0.1) / 4         # 0.25
    assert result["non_live"] == pytest.approx(5.0 / 9)
    assert result["live"] == pytest.approx(1551.8 / 2251)
    assert result["multi_turn"] == pytest.approx(0.25)
    assert result["overall"] == pytest.approx((non_live + live + multi_turn) / 3)
    assert result["overall"] == pytest.approx((5.0 / 9 + 1551.8 / 2251 + 0.25) / 3)
    assert result["summaries"]["non_live_ast"] == pytest.approx((0.6 + 0.8 + 0.7 + 0.6) / 4)
    assert result["summaries"]["non_live_exec"] == pytest.approx((0.5 + 0.6 + 0.5 + 0.4) / 4)
    assert result["missing"] == []


def test_a_category_without_score_counts_zero_with_its_full_weight():
    partial = {c: s for c, s in SCORES.items() if c not in ("rest", "live_multiple")}
    result = overall.leaderboard_overall(partial, SIZES)
    assert result["missing"] == ["rest", "live_multiple"]
    zeroed = overall.leaderboard_overall({**partial, "rest": 0, "live_multiple": 0}, SIZES)
    assert result["overall"] == zeroed["overall"]
    assert result["live"] == pytest.approx((1551.8 - 0.6 * 1053) / 2251)


def _bfcl_function(name):
    # BFCL's eval_runner_helper imports pandas and numpy; take its functions' source only.
    import bfcl.constant

    path = Path(bfcl.constant.__file__).parent / "eval_checker" / "eval_runner_helper.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {}
    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace[name]


def test_same_numbers_as_bfcls_own_accuracy_helpers():
    weighted = _bfcl_function("calculate_weighted_accuracy")
    unweighted = _bfcl_function("calculate_unweighted_accuracy")

    def score(c):
        return {"accuracy": SCORES[c], "total_count": SIZES[c], "display_accuracy": SCORES[c]}
    simple = unweighted([score("simple"), score("java"), score("javascript")])
    exec_simple = unweighted([score("exec_simple"), score("rest")])
    non_live = unweighted([simple, score("multiple"), score("parallel"),
                           score("parallel_multiple"), exec_simple, score("exec_multiple"),
                           score("exec_parallel"), score("exec_parallel_multiple"),
                           score("irrelevance")], display_na_if_category_missing=False)
    live = weighted([score(c) for c in overall.LIVE], display_na_if_category_missing=False)
    multi = unweighted([score(c) for c in overall.MULTI_TURN],
                       display_na_if_category_missing=False)
    total = unweighted([live, non_live, multi], display_na_if_category_missing=False)
    ours = overall.leaderboard_overall(SCORES, SIZES)
    assert math.isclose(ours["overall"], total["accuracy"], rel_tol=1e-12)
    assert math.isclose(ours["live"], live["accuracy"], rel_tol=1e-12)
    assert math.isclose(ours["non_live"], non_live["accuracy"], rel_tol=1e-12)


@pytest.mark.parametrize("scores, sizes, argument", [
    ({"sql": 0.5}, SIZES, "scores"),
    ({"simple": 1.5}, SIZES, "scores"),
    ({"simple": True}, SIZES, "scores"),
    ({"simple": 0.5}, {"simple": 400}, "sizes"),
])
def test_bad_inputs_are_named(scores, sizes, argument):
    with pytest.raises(ValueError, match=argument):
        overall.leaderboard_overall(scores, sizes)


def test_summary_bounds_bracket_the_not_evaluated_samples():
    per_category = {c: {"accuracy": 0.5, "correct": 2, "evaluated": 4, "not_evaluated": 0,
                        "total": 4} for c in overall.LEADERBOARD_CATEGORIES}
    per_category["exec_simple"] = {"accuracy": 0.5, "correct": 1, "evaluated": 2,
                                   "not_evaluated": 2, "total": 4}
    per_category["rest"] = {"accuracy": None, "correct": 0, "evaluated": 0, "not_evaluated": 4,
                            "total": 4}
    summary = runner.summarize(per_category)
    # rest has nothing evaluated: 0, as BFCL counts a category it has no score for.
    assert summary["missing"] == ["rest"] and summary["not_evaluated"] == {"exec_simple": 2,
                                                                         "rest": 4}
    exec_simple_group = (0.5 + 0.0) / 2
    non_live = (0.5 * 4 + exec_simple_group + 0.5 * 3 + 0.5) / 9
    assert summary["non_live"] == pytest.approx(non_live)
    assert summary["overall"] == pytest.approx((non_live + 0.5 + 0.5) / 3)
    low = (0.5 * 4 + (0.25 + 0.0) / 2 + 0.5 * 4) / 9       # not evaluated = wrong
    high = (0.5 * 4 + (0.75 + 1.0) / 2 + 0.5 * 4) / 9      # not evaluated = right
    assert summary["bounds"]["not_evaluated_wrong"] == pytest.approx((low + 1.0) / 3)
    assert summary["bounds"]["not_evaluated_right"] == pytest.approx((high + 1.0) / 3)
