"""benchmarks/roofline.py: the model runs and gives the issue's predicted ratios for
CKD at N=8192, H=1024, V=151,936 bf16 (a model, not a measurement)."""

from benchmarks import roofline


def test_roofline_ratios_to_the_floor(capsys):
    shape = roofline.Shape()
    got = {(gpu, sc): roofline.predict(shape, gpu, sc)["ratio_to_floor"]
           for gpu in roofline.GPUS for sc in roofline.SCENARIOS}
    # Issue 11: about 1.9x (H100) and 1.5x (4090) as the code was; about 1.4x and
    # 1.25x with the row kernel read 3 times, fp32 weight-gradient accumulation and
    # one final pass.
    assert 1.8 < got["H100", "start"] < 2.0 and 1.4 < got["RTX 4090", "start"] < 1.6
    assert 1.35 < got["H100", "target"] < 1.5 and 1.18 < got["RTX 4090", "target"] < 1.3
    for gpu in roofline.GPUS:  # each step can only remove traffic
        assert got[gpu, "start"] >= got[gpu, "row3"] >= got[gpu, "target"] > 1.0
    assert roofline.main(["--op", "logprobs", "--gpus", "H100"]) == 0
    assert "MODEL" in capsys.readouterr().out
