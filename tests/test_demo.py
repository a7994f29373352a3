"""The README's main job: a CKD run on tiny models built from configs."""

from star_train import cli
from star_train.demo import run


def test_demo_student_moves_towards_teacher():
    result = run(steps=40, log_every=40)
    assert result["kl_after"] < result["kl_before"]


def test_cli_demo_exit_code(capsys):
    assert cli.main(["demo", "--steps", "30"]) == 0
    assert "KL(teacher || student)" in capsys.readouterr().out
