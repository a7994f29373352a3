"""The README's main job: the CKD stage on the packaged sample with tiny models."""

from star_train import cli
from star_train.demo import SAMPLE, run


def test_sample_ships_with_the_package():
    assert SAMPLE.is_file() and len(SAMPLE.read_text().splitlines()) == 64


def test_demo_student_moves_towards_teacher(tmp_path):
    result = run(out_dir=str(tmp_path), steps=6, keep_models=True, log=lambda *_: None)
    assert result["steps"] == 6
    assert result["kl_after"] < result["kl_before"]
    assert (tmp_path / "ckd" / "checkpoints" / "step-000006").is_dir()


def _size(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_cli_demo_keeps_the_log_and_report_and_deletes_the_models(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "KL(teacher || student)" in out and str(tmp_path / "ckd") in out
    assert (tmp_path / "ckd" / "train_log.jsonl").is_file()
    assert (tmp_path / "ckd" / "report" / "summary.md").is_file()
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "ckd" / "checkpoints").exists()
    assert _size(tmp_path) < 2_000_000  # was about 650 MB
