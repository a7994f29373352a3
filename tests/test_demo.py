"""The README's main job: the CKD stage on the packaged sample with tiny models."""

from star_train import cli
from star_train.demo import SAMPLE, run


def test_sample_ships_with_the_package():
    assert SAMPLE.is_file() and len(SAMPLE.read_text().splitlines()) == 64


def test_demo_student_moves_towards_teacher(tmp_path):
    result = run(out_dir=str(tmp_path), steps=6, log=lambda *_: None)
    assert result["steps"] == 6
    assert result["kl_after"] < result["kl_before"]
    assert (tmp_path / "ckd" / "checkpoints" / "step-000006").is_dir()


def test_cli_demo_exit_code(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert "KL(teacher || student)" in capsys.readouterr().out
