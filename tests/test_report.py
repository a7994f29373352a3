"""star-train report: plots and a summary from a run folder's train_log.jsonl."""

import json

import pytest

from star_train import cli
from star_train.report import read_log, summarize

pytest.importorskip("matplotlib")


def _write_log(run_dir, records, torn_tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + torn_tail)
    (run_dir / "config.json").write_text(json.dumps({"grpo": {}, "train": {}}))


def test_report_writes_a_plot_per_logged_metric_and_a_summary(tmp_path, capsys):
    records = [{"step": s, "loss": 2.0 - 0.1 * s, "kl": 0.01 * s, "reward_mean": 0.1 * s,
                "grad_norm": 1.0, "tokens": 100, "seconds": 0.5, "tokens_per_s": 200.0,
                "lr": 1e-3, "updated": s != 3} for s in range(1, 21)]
    records[2].update(loss=None, kl=None, grad_norm=None)  # step 3 did not update
    run = tmp_path / "run"
    _write_log(run, records, torn_tail='{"step": 21, "lo')
    assert cli.main(["report", str(run)]) == 0
    out = run / "report"
    for key in ("loss", "kl", "reward_mean", "grad_norm", "tokens_per_s", "lr"):
        png = (out / f"{key}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 2000
    text = (out / "summary.md").read_text()
    assert text.startswith("# Sim-RL run") and "| 20 | 19 | 2,000 | 10.0 s | 200.0 |" in text
    # first tenth of the 19 logged losses: steps 1 (1.9); last tenth: step 20 (0.0)
    summary = summarize(read_log(run))
    assert summary["loss_start"] == pytest.approx(1.9) and summary["loss_end"] == pytest.approx(0.0)
    assert "summary.md" in capsys.readouterr().out


def test_report_on_a_folder_without_a_log_is_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_log.jsonl does not exist" in err
