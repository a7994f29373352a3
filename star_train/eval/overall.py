"""BFCL v3's overall score, computed as the leaderboard code in ``nvidia-bfcl`` computes it.

Mirrors ``bfcl.eval_checker.eval_runner_helper`` (26.3): ``get_category_score``,
``calculate_weighted_accuracy``, ``calculate_unweighted_accuracy`` and the summary part of
``generate_leaderboard_csv`` (that module imports numpy, pandas and the model metadata,
so it is not imported):

* non-live = unweighted mean of nine groups: simple (itself the unweighted mean of Python
  simple, Java and JavaScript), multiple, parallel, parallel_multiple, exec simple (the
  unweighted mean of exec_simple and rest), exec_multiple, exec_parallel,
  exec_parallel_multiple and irrelevance;
* live = the mean of live_simple, live_multiple, live_parallel, live_parallel_multiple,
  live_irrelevance and live_relevance weighted by their sample counts;
* multi-turn = unweighted mean of base, miss_func, miss_param and long_context;
* overall = unweighted mean of non-live, live and multi-turn.

A category without a score counts as accuracy 0 with its full size as weight (BFCL's rule
for a category that was not evaluated; BFCL then shows "N/A" for the summaries that use
it but still folds the 0 into the overall). ``missing`` lists those categories.
"""

from __future__ import annotations

NON_LIVE = ("simple", "multiple", "parallel", "parallel_multiple", "java", "javascript",
            "exec_simple", "exec_multiple", "exec_parallel", "exec_parallel_multiple", "rest",
            "irrelevance")
LIVE = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
        "live_irrelevance", "live_relevance")
MULTI_TURN = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param",
              "multi_turn_long_context")
LEADERBOARD_CATEGORIES = NON_LIVE + LIVE + MULTI_TURN


def _weighted(groups: list) -> dict:
    count = sum(group["total_count"] for group in groups)
    accuracy = (sum(group["accuracy"] * group["total_count"] for group in groups) / count
                if count else 0)
    return {"accuracy": accuracy, "total_count": count}


def _unweighted(groups: list) -> dict:
    return {"accuracy": sum(group["accuracy"] for group in groups) / len(groups),
            "total_count": sum(group["total_count"] for group in groups)}


def leaderboard_overall(scores: dict, sizes: dict) -> dict:
    """BFCL v3's summaries from per-category accuracies.

    ``scores``: ``{category: accuracy}`` for the categories that were scored.
    ``sizes``: ``{category: number of samples}`` for every leaderboard category (the
    weights of the live mean, as BFCL's ``total_count``).
    Returns ``{"overall", "non_live", "live", "multi_turn", "summaries", "missing"}``.
    """
    unknown = sorted(set(scores) - set(LEADERBOARD_CATEGORIES))
    if unknown:
        raise ValueError(f"scores: not BFCL v3 leaderboard categories: {unknown}")
    lacking = sorted(set(LEADERBOARD_CATEGORIES) - set(sizes))
    if lacking:
        raise ValueError(f"sizes: no sample count for {lacking}")
    for category, accuracy in scores.items():
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) \
                or not 0 <= accuracy <= 1:
            raise ValueError(f"scores[{category!r}]: expected an accuracy in [0, 1], "
                             f"got {accuracy!r}")

    def score(category):
        return {"accuracy": scores.get(category, 0), "total_count": sizes[category]}

    simple = _unweighted([score("simple"), score("java"), score("javascript")])
    exec_simple = _unweighted([score("exec_simple"), score("rest")])
    summary_ast = _unweighted([simple, score("multiple"), score("parallel"),
                               score("parallel_multiple")])
    summary_exec = _unweighted([exec_simple, score("exec_multiple"), score("exec_parallel"),
                                score("exec_parallel_multiple")])
    non_live = _unweighted([simple, score("multiple"), score("parallel"),
                            score("parallel_multiple"), exec_simple, score("exec_multiple"),
                            score("exec_parallel"), score("exec_parallel_multiple"),
                            score("irrelevance")])
    live_ast = _weighted([score(c) for c in LIVE[:4]])
    live = _weighted([score(c) for c in LIVE])
    multi_turn = _unweighted([score(c) for c in MULTI_TURN])
    overall = _unweighted([live, non_live, multi_turn])
    return {"overall": overall["accuracy"], "non_live": non_live["accuracy"],
            "live": live["accuracy"], "multi_turn": multi_turn["accuracy"],
            "summaries": {"non_live_ast": summary_ast["accuracy"],
                          "non_live_exec": summary_exec["accuracy"],
                          "non_live_simple_ast": simple["accuracy"],
                          "non_live_simple_exec": exec_simple["accuracy"],
                          "live_ast": live_ast["accuracy"],
                          "irrelevance": _unweighted([score("irrelevance"),
                                                      score("live_irrelevance")])["accuracy"],
                          "relevance": scores.get("live_relevance", 0)},
            "missing": [c for c in LEADERBOARD_CATEGORIES if c not in scores]}
