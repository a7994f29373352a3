"""benchmarks/roofline.py: the model runs and gives the issue's predicted ratios for
CKD at N=8192, H=1024, V=151,936 bf16 (a model, not a measurement)."""

from benchmarks import roofline


def test_roofline_ratios_to_the_floor(capsys):
    shape = roofline.Shape()
    got = {(gpu, sc): roofline.predict(shape, gpu, sc)["ratio_to_floor"]
           for gpu in roofline.GPUS for sc in roofline.SCENARIOS}
    # Issue 11: about 1.9x (H100) and 1.5x (4090) as the code was. Issue 12's exact top-m
    # adds a tie pass to the row kernel (counted on every row, an upper bound): back to
    # about 1.9x / 1.5x; with fp32 weight-gradient accumulation and one final pass on top,
    # about 1.5x / 1.3x.
    assert 1.8 < got["H100", "start"] < 2.0 and 1.4 < got["RTX 4090", "start"] < 1.6
    assert 1.45 < got["H100", "target"] < 1.6 and 1.22 < got["RTX 4090", "target"] < 1.35
    for gpu in roofline.GPUS:  # row3 and target each remove traffic; exact adds a pass
        assert got[gpu, "start"] >= got[gpu, "row3"] and got[gpu, "exact"] > got[gpu, "row3"]
        assert got[gpu, "exact"] > got[gpu, "target"] > 1.0
    assert roofline.main(["--op", "logprobs", "--gpus", "H100"]) == 0
    assert "MODEL" in capsys.readouterr().out
