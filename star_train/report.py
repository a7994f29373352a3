"""``star-train report RUN_DIR``: plots and a short summary of a training run.

Reads the run folder's ``train_log.jsonl`` (one line per optimizer step, written by the
training skeleton) and ``config.json`` and writes, under ``RUN_DIR/report/``, one PNG per
metric the run logged (loss, KL, reward, gradient norm, tokens/s, learning rate) against
the step, and ``summary.md``: steps, tokens, wall time, the loss at the start and at the
end, and links to the plots. Plotting needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import json
from pathlib import Path

# log key -> (title, y label); plotted when at least one step logged a number for it
METRICS = {
    "loss": ("training loss", "loss"),
    "kl": ("KL to the reference policy", "KL (k-estimator)"),
    "reward_mean": ("mean reward of the sampled completions", "reward"),
    "grad_norm": ("gradient norm (before clipping)", "norm"),
    "tokens_per_s": ("throughput", "tokens / s"),
    "lr": ("learning rate", "lr"),
}


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "train_log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: RUN_DIR must be a training run's "
                                "folder (train.out_dir)")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a torn last line of a run killed while appending
            raise ValueError(f"{path} line {number}: not valid JSON") from None
    if not records:
        raise ValueError(f"{path} holds no steps yet")
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict]) -> dict:
    """Numbers for the summary: the loss averaged over the first and last tenth of steps."""
    _, losses = _series(records, "loss")
    tenth = max(1, len(losses) // 10)
    seconds = sum(r.get("seconds") or 0.0 for r in records)
    tokens = sum(r.get("tokens") or 0 for r in records)
    return {"steps": records[-1]["step"], "updated_steps": sum(bool(r.get("updated", True))
                                                               for r in records),
            "tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "loss_start": _mean(losses[:tenth]), "loss_end": _mean(losses[-tenth:])}


def write_report(run_dir: str | Path) -> Path:
    """Write the plots and ``summary.md`` under ``RUN_DIR/report``; returns that folder."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("star-train report draws its plots with matplotlib: "
                          "pip install matplotlib") from error
    run_dir = Path(run_dir)
    records = read_log(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    plots = []
    for key, (title, ylabel) in METRICS.items():
        steps, values = _series(records, key)
        if not values:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(steps, values, marker="." if len(values) < 50 else None, linewidth=1)
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{key}.png", dpi=100)
        plt.close(fig)
        plots.append(key)
    summary = summarize(records)
    config = run_dir / "config.json"
    stage = "unknown stage"
    if config.is_file():
        sections = json.loads(config.read_text())
        stage = "Sim-RL" if "grpo" in sections else "CKD" if "ckd" in sections else stage

    def number(value, fmt):
        return "–" if value is None else format(value, fmt)

    lines = [f"# {stage} run: {run_dir.resolve()}", "",
             "| steps | updated | tokens | wall time | tokens/s | loss (first 10%) | "
             "loss (last 10%) |", "|---|---|---|---|---|---|---|",
             f"| {summary['steps']} | {summary['updated_steps']} | {summary['tokens']:,} | "
             f"{summary['seconds']} s | {number(summary['tokens_per_s'], ',.1f')} | "
             f"{number(summary['loss_start'], '.4f')} | {number(summary['loss_end'], '.4f')} |",
             ""]
    lines += [f"![{METRICS[key][0]}]({key}.png)" for key in plots]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return out
