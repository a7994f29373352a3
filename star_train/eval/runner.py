"""BFCL v3 end to end: every category that runs offline, resumable, with the leaderboard's overall.

``run_bfcl`` drives the three kinds of category (single-turn AST and (ir)relevance in
``bfcl.py``, executable in ``executable.py``, multi-turn in ``multi_turn.py``) through
one ``generate_fn(prompts) -> completions``, keeps every scored sample in a
``ResultStore`` (a re-run with the same settings skips what is already scored) and
computes BFCL v3's overall with ``overall.leaderboard_overall``.

What the overall means here. A category's accuracy is over its *evaluated* samples. Not
evaluated are the executable samples that need the network and all of ``rest``; a
category with nothing evaluated counts 0, as BFCL's leaderboard counts a category it has
no score for. Because that choice moves the number, the summary also gives the overall
with every not-evaluated sample counted wrong and counted right: the true full-BFCL
value of this model lies between the two. With ``limit`` each category is a sample of
its first ``limit`` questions, while the live mean keeps BFCL's weights (full category
sizes), so the number estimates a full run.

Under torchrun (``torchrun --nproc-per-node N -m star_train eval ...``) the ranks share
the work in whole chunks of samples (each rank's ``generate_fn`` sees the batches one
process would) and all-gather the scored rows after each round of N chunks; every rank
holds every row and computes the summary, rank 0 writes the results file in the
single-process order and prints. A results file resumes on any number of ranks.
"""

from __future__ import annotations

import importlib.metadata

from ..chat.templates import QWEN3, ChatRenderer
from ..runtime import distributed
from . import bfcl, executable, multi_turn
from .overall import LEADERBOARD_CATEGORIES, leaderboard_overall
from .results import ResultStore

SINGLE_TURN = bfcl.CATEGORIES
EXECUTABLE = executable.EXEC_CATEGORIES + (executable.REST_CATEGORY,)
ALL_CATEGORIES = LEADERBOARD_CATEGORIES  # BFCL v3's "all" collection, leaderboard order


def checked_categories(categories) -> list:
    """A category list ("all" for every one) checked against what can run."""
    if isinstance(categories, str):
        categories = ALL_CATEGORIES if categories == "all" else categories.split(",")
    categories = [category.strip() for category in categories]
    unknown = [category for category in categories if category not in ALL_CATEGORIES]
    if not categories or unknown:
        raise ValueError(f"categories: unknown {unknown}; choose from all, "
                         f"{', '.join(ALL_CATEGORIES)}")
    if len(set(categories)) != len(categories):
        raise ValueError(f"categories: listed twice in {categories}")
    return categories


def category_size(category: str) -> int:
    if category in SINGLE_TURN:
        return len(bfcl.load_category(category))
    if category in EXECUTABLE:
        return len(executable.load_category(category))
    return len(multi_turn.load_category(category))


def _load(category: str, limit):
    if category in SINGLE_TURN:
        return bfcl.load_category(category, limit)
    if category in EXECUTABLE:
        return executable.load_category(category, limit)
    return multi_turn.load_category(category, limit)


def _generate(generate_fn, prompts: list) -> list:
    completions = list(generate_fn(prompts))
    if len(completions) != len(prompts):
        raise ValueError(f"generate_fn: returned {len(completions)} completions for "
                         f"{len(prompts)} prompts")
    return completions


def _run_single_turn(category, samples, generate_fn, store, chat_format, chunk_size, bar,
                     world):
    for sample in samples:
        if (isinstance(sample, executable.ExecSample) and sample.not_evaluated
                and store.get(category, sample.id) is None):
            store.add(executable.score_completion(sample, "", chat_format))  # nothing to ask
            bar.update(1)
    pending = [s for s in samples if store.get(category, s.id) is None]
    if category in EXECUTABLE:
        build, score = executable.build_prompt, executable.score_completion
    else:
        build, score = bfcl.build_prompt, bfcl.score_completion

    def run_chunk(chunk, on_row):
        prompts = [build(sample, chat_format) for sample in chunk]
        for sample, completion in zip(chunk, _generate(generate_fn, prompts)):
            on_row(score(sample, completion, chat_format))

    _run_chunks(_chunks(pending, chunk_size), run_chunk, store, bar, world)


def _chunks(items: list, size: int) -> list:
    return [items[start:start + size] for start in range(0, len(items), size)]


def _run_chunks(chunks, run_chunk, store, bar, world) -> None:
    """``run_chunk(chunk, on_row)`` for every chunk (it calls ``on_row(row)`` per scored
    sample), each row added to ``store`` in the order one process adds them.

    In a world of one each row is stored (and saved) as it is scored. Under torchrun the
    chunks are dealt round-robin (``distributed.in_rounds``): each rank scores whole
    chunks, so every ``generate_fn`` call gets the prompts it gets in one process (the
    same batches, hence the same greedy completions); after each round every rank adds
    the round's rows in chunk order, rank 0 writing them to the results file."""
    if not world.enabled:
        for chunk in chunks:
            run_chunk(chunk, lambda row: (store.add(row), bar.update(1)))
        return

    def local(chunk):
        rows = []
        run_chunk(chunk, rows.append)
        return rows

    for _, rows in distributed.in_rounds(world, chunks, local):
        for row in rows:
            store.add(row)
        bar.update(len(rows))


def _category_scores(rows: list) -> dict:
    correct = sum(row["correct"] is True for row in rows)
    not_evaluated = sum(row["correct"] is None for row in rows)
    evaluated = len(rows) - not_evaluated
    return {"accuracy": correct / evaluated if evaluated else None, "correct": correct,
            "evaluated": evaluated, "not_evaluated": not_evaluated, "total": len(rows)}


def summarize(per_category: dict) -> dict:
    """The leaderboard overall from per-category scores, with its not-evaluated bounds."""
    sizes = {category: category_size(category) for category in ALL_CATEGORIES}
    scored = {c: s["accuracy"] for c, s in per_category.items() if s["accuracy"] is not None}
    low = {c: s["correct"] / s["total"] for c, s in per_category.items() if s["total"]}
    high = {c: (s["correct"] + s["not_evaluated"]) / s["total"]
            for c, s in per_category.items() if s["total"]}
    high.update({c: 1.0 for c in ALL_CATEGORIES if c not in high})  # not run at all
    leaderboard = leaderboard_overall(scored, sizes)
    return {**leaderboard,
            "not_evaluated": {c: s["not_evaluated"] for c, s in per_category.items()
                              if s["not_evaluated"]},
            "bounds": {"not_evaluated_wrong": leaderboard_overall(low, sizes)["overall"],
                       "not_evaluated_right": leaderboard_overall(high, sizes)["overall"]},
            "sizes": sizes}


def source(categories) -> dict:
    single = [c for c in categories if c in SINGLE_TURN]
    return {**(bfcl.bfcl_source(single) if single else bfcl.bfcl_source()),
            "multi_turn_step_limit": multi_turn.step_limit()}


def run_bfcl(generate_fn, categories="all", *, limit: int | None = None,
             multi_turn_limit: int | None = None, chat_format: ChatRenderer = QWEN3,
             results_path=None, settings: dict | None = None, chunk_size: int = 32,
             progress: bool = True, world: distributed.World | None = None) -> dict:
    """Run ``categories`` through ``generate_fn`` and score them with BFCL's rules.

    ``multi_turn_limit``: a smaller sample for the multi-turn categories (each is a whole
    dialogue of long prompts; defaults to ``limit``).
    ``results_path``: the per-sample jsonl (resumed when it exists with the same
    ``settings``). ``chunk_size``: prompts per ``generate_fn`` call in the single-turn
    categories, and conversations run in lockstep in the multi-turn ones (results are
    saved after each chunk or finished conversation).
    ``world``: under torchrun (``distributed.current()``) the samples are split over the
    ranks in whole chunks and merged: every rank returns the summary one process computes,
    and rank 0 alone writes the results file, its rows in the single-process order.
    Default a world of one (a caller on one rank of a larger job runs alone).
    Returns ``{"source", "settings", "limit", "categories": {name: {"accuracy" (over
    evaluated samples, None if none), "correct", "evaluated", "not_evaluated", "total"}},
    "overall": summarize(...)}``.
    """
    from tqdm.auto import tqdm

    categories = checked_categories(categories)
    bfcl._checked_limit(limit)
    if multi_turn_limit is not None:
        bfcl._checked_positive("multi_turn_limit", multi_turn_limit)
    else:
        multi_turn_limit = limit
    bfcl._checked_positive("chunk_size", chunk_size)
    settings = {**(settings or {}), "chat_format": chat_format.name,
                "bfcl": importlib.metadata.version(bfcl.BFCL_DISTRIBUTION)}
    per_category = {}
    world = world or distributed.World()
    if world.is_main:  # rank 0 creates, checks or repairs the file before the others read it
        store = ResultStore(results_path, settings)
    world.barrier()
    if not world.is_main:
        store = ResultStore(results_path, settings, writer=False)
    world.barrier()  # everyone has read it before rank 0 appends
    with store:
        for category in categories:
            is_multi_turn = category in multi_turn.MULTI_TURN_CATEGORIES
            samples = _load(category, multi_turn_limit if is_multi_turn else limit)
            done = sum(store.get(category, s.id) is not None for s in samples)
            with tqdm(total=len(samples), initial=done, desc=category, unit="sample",
                      disable=not progress, leave=False) as bar:
                if is_multi_turn:
                    pending = [s for s in samples if store.get(category, s.id) is None]

                    def run_chunk(chunk, on_row):
                        multi_turn.run_conversations(chunk, generate_fn,
                                                     chat_format=chat_format, on_done=on_row)

                    _run_chunks(_chunks(pending, chunk_size), run_chunk, store, bar, world)
                else:
                    _run_single_turn(category, samples, generate_fn, store, chat_format,
                                     chunk_size, bar, world)
            per_category[category] = _category_scores([store.get(category, s.id)
                                                       for s in samples])
    return {"source": source(categories), "settings": store.settings, "limit": limit,
            "multi_turn_limit": multi_turn_limit,
            "categories": per_category, "overall": summarize(per_category)}
