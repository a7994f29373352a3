"""The results of a run: one JSON naming each variant, a Markdown table and a plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

from .evaluate import CATEGORIES


def _commit() -> str:
    """The code's commit: git's, or (a run from an exported copy) its ``SNAPSHOT_OF`` file."""
    snapshot = Path(__file__).resolve().parents[2] / "SNAPSHOT_OF"
    if snapshot.is_file():
        return snapshot.read_text().strip() + " (exported copy)"
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _row(result: dict) -> dict:
    held = result["heldout"]
    return {"parameters": result["parameters"], "layers": result["layers"],
            "bfcl": {c: result["bfcl"][c] for c in CATEGORIES},
            "bfcl_mean_accuracy": result["bfcl_mean_accuracy"],
            "heldout_reward_mean": held["reward_mean"],
            "heldout_reward_clipped_mean": held["reward_mean_valid_as_0"],
            "heldout_malformed_fraction": held["malformed_fraction"],
            "heldout_call_fraction": held["call_fraction"], "eval_seconds": result["seconds"]}


def _train_logs(work: Path) -> dict:
    logs = {}
    for stage in ("teacher", "student-sft", "student-ckd", "student-ckd-simrl"):
        path = work / stage / "train_log.jsonl"
        if path.is_file():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            logs[stage] = [{k: line.get(k) for k in ("step", "loss", "reward_mean", "groups_sampled",
                                                     "groups_kept", "updated", "kl", "seconds")
                            if k in line} for line in lines]
    return logs


def write_report(size: str, cfg: dict, work: Path, variants, timings: dict, results_dir: Path) -> dict:
    results = {}
    for name in variants:
        path = work / "eval" / f"{name}.json"
        if path.is_file():
            results[name] = _row(json.loads(path.read_text()))
    summary = {
        "experiment": f"curriculum-{size}",
        "command": f"python -m benchmarks.curriculum --size {size}",
        "resume": "rerun the same command: finished steps are skipped, a training stage resumes "
                  "from its last checkpoint",
        "commit": _commit(), "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs".strip(),
        "load_average_when_written": os.getloadavg(),
        "settings": cfg,
        "data": {"file": "benchmarks/curriculum/data/xlam_rows.jsonl",
                 "train": f"first {cfg['train_rows']} rows", "heldout": f"last {cfg['heldout_rows']} rows"},
        "bfcl": {"categories": list(CATEGORIES), "samples_per_category": cfg["eval"]["bfcl_limit"],
                 "which": "the first N samples of each BFCL v3 category (nvidia-bfcl)"},
        "finished_steps": timings, "variants": results,
        "missing_variants": [v for v in variants if v not in results],
        "train_logs": _train_logs(work),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"curriculum-{size}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    stem.with_suffix(".md").write_text(_markdown(summary))
    if results:
        _plot(summary, stem.with_suffix(".png"))
    return summary


def _markdown(summary: dict) -> str:
    head = "| variant | layers | " + " | ".join(CATEGORIES) + " | BFCL mean | held-out reward | malformed | calls |"
    lines = [f"# {summary['experiment']}", "", f"Command: `{summary['command']}` (commit "
             f"{summary['commit']}, written {summary['written']}). BFCL v3: first "
             f"{summary['bfcl']['samples_per_category']} samples per category. Held-out: "
             f"{summary['data']['heldout']} of `{summary['data']['file']}`; train: "
             f"{summary['data']['train']}.", "", head, "|" + "---|" * (len(CATEGORIES) + 6)]
    for name, row in summary["variants"].items():
        cells = [f"{row['bfcl'][c]['correct']}/{row['bfcl'][c]['total']}" for c in CATEGORIES]
        lines.append(f"| {name} | {row['layers']} | " + " | ".join(cells)
                     + f" | {row['bfcl_mean_accuracy']:.1%} | {row['heldout_reward_mean']:.3f} | "
                       f"{row['heldout_malformed_fraction']:.0%} | {row['heldout_call_fraction']:.0%} |")
    if summary["missing_variants"]:
        lines += ["", f"Not finished: {', '.join(summary['missing_variants'])}."]
    simrl = summary["train_logs"].get("student-ckd-simrl")
    if simrl:
        kept = ", ".join(f"{line.get('groups_kept')}/{line.get('groups_sampled')}" for line in simrl)
        updates = sum(1 for line in simrl if line.get("updated"))
        lines += ["", f"Sim-RL: {len(simrl)} steps, groups kept by dynamic filtering per step: {kept}; "
                      f"{updates} updated the model"
                      + ("" if updates else " (so student-ckd-simrl is the CKD model)") + "."]
    lines += ["", "Wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["finished_steps"].items())]
    return "\n".join(lines) + "\n"


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        row = summary["variants"][name]
        left.bar([c + i * width for c in range(len(CATEGORIES))],
                 [row["bfcl"][c]["accuracy"] for c in CATEGORIES], width, label=name)
    left.set_xticks([c + 0.4 - width / 2 for c in range(len(CATEGORIES))], CATEGORIES, fontsize=8)
    left.set_ylabel("BFCL v3 accuracy")
    left.legend(fontsize=7)
    right.bar(names, [summary["variants"][n]["heldout_reward_mean"] for n in names])
    right.axhline(0, color="black", linewidth=0.5)
    right.set_ylabel("held-out similarity reward (-1 malformed)")
    right.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.suptitle(f"{summary['experiment']}: SmolLM2 student variants vs teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
