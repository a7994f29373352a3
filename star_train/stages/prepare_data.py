"""``star-train prepare-data``: the released Sim-RL data preparation over local files.

``scripts/prepare_rl_data.sh`` of the released code, step by step, with nothing
downloaded (each source is a jsonl file you fetched yourself):

1. Convert each source to STAR records (``data.sources.converters``), after an optional
   seeded sample of its rows (``dataset_size``, as ``format_data.py --dataset_size``).
2. ``filter_on_simrl`` (``filter_simrl``): keep a record when its own last message,
   rendered as a generation, scores above 0.99 against itself under the released reward
   rules: its calls parse, name listed tools and pass declared arguments only, and no
   argument is NaN. Records our loader would refuse (``data.records.validate_record``:
   e.g. no user query before the answer) are dropped too, counted apart.
3. ToolMind only, as released: the labels of ``labeling_messages.py`` and the stratified
   sample of ``data_proportion.py`` (``[proportion]``; prompt tokens counted with the
   offline Qwen3 tokenizer on the chat-template prompt, or the released character
   estimate with ``token_count = "chars"``).
4. The merge, in the released order: ToolMind (sampled), xLAM, ToolACE, Hammer.

Output in ``output.out_dir``: ``<source>_messages.jsonl`` per source (converted and
filtered), ``toolmind_labeled_messages.jsonl`` and
``toolmind_labeled_messages_proportion.jsonl``, ``merged_messages.jsonl`` (records
``star_train.data.records.load_records`` reads) and ``summary.json`` with every count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..chat.qwen3 import THINK_CLOSE_TAG, render_prompt
from ..data.records import validate_record
from ..data.sources import convert, label_record, proportion_sample, read_jsonl, sample_rows
from ..data.sources.proportion import estimated_prompt_tokens, prompt_messages
from ..reward import released_label, similarity_reward
from ..runtime.config import enforce, section, setting
from ..runtime.run_folder import open_run, write_atomic

SOURCES = ("toolmind", "xlam", "toolace", "hammer")  # the released merge order


@dataclass
class SourceConfig:
    path: str = setting("", path=True)   # the source's jsonl; "" = not used
    dataset_size: int = setting(0, min=0)  # seeded sample of rows before conversion; 0 = all
    filter_simrl: bool = True            # the released filter_on_simrl step


@dataclass
class ProportionConfig:
    """``data_proportion.py`` on ToolMind (released: --dataset-size 50000)."""
    enabled: bool = True
    dataset_size: int = setting(50000, min=1)
    seed: int = 42
    max_turns: int = setting(10, min=0)
    response_rate: float = setting(0.2, min=0.0, max=1.0)
    multi_step_rate: float = setting(0.3, min=0.0, max=1.0)
    single_turns_rate: float = setting(0.3, min=0.0, max=1.0)
    parallel_rate: float = setting(0.5, min=0.0, max=1.0)
    max_prompt_tokens: int = setting(8192, min=1)
    token_count: str = setting("tokenizer", choices=("tokenizer", "chars"))


@dataclass
class PrepareOutputConfig:
    out_dir: str = setting("data/prepared", path=True)
    seed: int = 42   # format_data.py's --seed (the dataset_size samples)


@dataclass
class PrepareDataConfig:
    toolmind: SourceConfig = section(SourceConfig)
    xlam: SourceConfig = section(SourceConfig)
    toolace: SourceConfig = section(SourceConfig)
    hammer: SourceConfig = section(SourceConfig)
    proportion: ProportionConfig = section(ProportionConfig)
    output: PrepareOutputConfig = section(PrepareOutputConfig)

    def validate(self) -> "PrepareDataConfig":
        used = [name for name in SOURCES if getattr(self, name).path]
        enforce(self, [(used, "give at least one source path: "
                              + ", ".join(f"{name}.path" for name in SOURCES))], {})
        return self


# ---------------------------------------------------------------- filter_on_simrl

def self_generation(message: dict) -> str:
    """The released filter's "generation" for a reference: the template's rendering of
    the message alone without its header (its label's answer), behind an empty think
    block."""
    return "<think></think>" + released_label(message).split(THINK_CLOSE_TAG, 1)[1]


def self_score(record: dict) -> float:
    """The released ``filter_on_simrl`` score of a record: its last message against itself
    under the released reward rules (-1 where the released code fails on it)."""
    reference = record["messages"][-1]
    try:
        return similarity_reward(self_generation(reference), reference, record["tools"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return -1.0


def filter_on_simrl(records: list[dict], counts: dict) -> list[dict]:
    """Records whose self score is above 0.99 and which our loader accepts."""
    kept = []
    for record in records:
        if self_score(record) <= 0.99:
            counts["simrl_filtered"] += 1
            continue
        kept.append(record)
    return kept


def _loadable(records: list[dict], counts: dict) -> list[dict]:
    kept = []
    for record in records:
        try:
            validate_record(record)
        except ValueError:
            counts["not_loadable"] += 1
            continue
        kept.append(record)
    return kept


# ---------------------------------------------------------------- the command

def _write(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _token_counter(cfg: ProportionConfig, tokenizer):
    if cfg.token_count == "chars":
        return estimated_prompt_tokens
    if tokenizer is None:
        from ..chat.tokenizer import qwen3_tokenizer

        tokenizer = qwen3_tokenizer()

    def count(record):
        text = render_prompt(prompt_messages(record), record.get("tools") or None)
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count


def run_prepare_data(cfg: PrepareDataConfig, *, tokenizer=None, log=print) -> dict:
    """Run the preparation; returns the summary (also written to summary.json)."""
    cfg.validate()
    out = open_run(cfg.output.out_dir, cfg)
    summary, merged = {}, {}
    for name in SOURCES:
        source = getattr(cfg, name)
        if not source.path:
            continue
        rows = sample_rows(read_jsonl(source.path), source.dataset_size, cfg.output.seed)
        records, problems = convert(name, rows)
        counts = {"rows": len(rows), "converted": len(records), "skipped": len(problems),
                  "simrl_filtered": 0, "not_loadable": 0}
        if source.filter_simrl:
            records = filter_on_simrl(records, counts)
        records = _loadable(records, counts)
        counts["kept"] = len(records)
        counts["problems"] = [list(problem) for problem in problems[:20]]
        _write(out / f"{name}_messages.jsonl", records)
        if name == "toolmind" and cfg.proportion.enabled:
            records = [label_record(record) for record in records]
            _write(out / "toolmind_labeled_messages.jsonl", records)
            p, report = cfg.proportion, {}
            records = proportion_sample(
                records, p.dataset_size, seed=p.seed, max_turns=p.max_turns,
                response_rate=p.response_rate, multi_step_rate=p.multi_step_rate,
                single_turns_rate=p.single_turns_rate, parallel_rate=p.parallel_rate,
                max_prompt_tokens=p.max_prompt_tokens,
                count_tokens=_token_counter(p, tokenizer), report=report)
            _write(out / "toolmind_labeled_messages_proportion.jsonl", records)
            counts["proportion"] = report
            if not records:
                log("toolmind: no record left after the proportion sample (the released "
                    "script stops here too): check [proportion]")
        merged[name] = records
        summary[name] = counts
        log(f"{name}: {counts['kept']} of {counts['rows']} rows kept ({counts['skipped']} not "
            f"converted, {counts['simrl_filtered']} filtered, {counts['not_loadable']} not "
            f"loadable)")
    everything = [record for name in SOURCES for record in merged.get(name, [])]
    _write(out / "merged_messages.jsonl", everything)
    summary["merged"] = len(everything)
    summary["merged_path"] = str(out / "merged_messages.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"{len(everything)} records -> {summary['merged_path']}")
    return summary


__all__ = ["PrepareDataConfig", "filter_on_simrl", "run_prepare_data",
           "self_generation", "self_score"]
