"""Smoke tests of the benchmark suite: the CLI runs end to end and the baselines compute
what they claim. Tiny shapes, no timing assertions (timing belongs in benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import cli, ops, report
from star_kernels import reference

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n=24, h=16, v=300, k=7, dtype="float64")


def _inputs(op, **kw):
    case = ops.Case(op=op, **{**TINY, **kw})
    return case, ops.make_inputs(case)


def test_cli_end_to_end_writes_json_markdown_and_plots(tmp_path):
    argv = ["ckd", "grpo", "--preset", "smoke", "--n", "32", "--impls",
            "naive,star_torch,star_triton,floor,liger_grpo", "--no-isolate",
            "--repeats", "1", "--warmup", "0", "--out", str(tmp_path), "--name", "t", "--quiet"]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    env = data["env"]
    for key in ("date", "command", "device_name", "cpu_model", "torch", "triton", "cuda"):
        assert key in env
    assert env["command"].startswith("python -m benchmarks")
    by_impl = {(r["op"], r["impl"]): r for r in data["records"]}
    assert set(by_impl) >= {("ckd", "naive"), ("ckd", "star_torch"), ("ckd", "floor"),
                            ("ckd", "star_triton"), ("grpo", "liger_grpo")}
    naive = by_impl[("ckd", "naive")]
    assert naive["status"] == "ok", naive
    assert set(naive["time_ms"]) == {"fwd", "bwd", "fwdbwd"}
    assert set(naive["mem_bytes"]) == {"fwd", "fwdbwd"}
    assert naive["ratios"]["fwdbwd"]["time_vs_naive"] == pytest.approx(1.0)
    assert "time_vs_floor" in naive["ratios"]["fwdbwd"]
    # Nothing is silently dropped: what cannot run here says why.
    assert by_impl[("ckd", "star_triton")]["status"] == "not available"
    assert by_impl[("grpo", "liger_grpo")]["status"] in ("ok", "not installed", "error")
    md = (tmp_path / "t.md").read_text()
    assert "| implementation |" in md and "naive (eager)" in md and "floor (bare GEMMs)" in md
    assert (tmp_path / "t_ckd.png").stat().st_size > 0


def test_isolated_worker_reports_time_and_rss(tmp_path):
    spec = {"impl": "naive", "case": ops.Case(op="logprobs", n=16, h=8, v=200, k=4).to_dict(),
            "warmup": 0, "repeats": 1}
    rec = cli._run_isolated(spec, timeout=120)
    assert rec["status"] == "ok", rec
    assert rec["time_ms"]["fwdbwd"]["median"] > 0
    assert rec["mem_bytes"]["fwdbwd"] >= 0


def test_naive_ckd_is_the_reference():
    case, i = _inputs("ckd")
    loss = ops.Naive(case, i).forward()
    want = reference.fused_linear_ckd_loss(i["hidden"], i["weight"], i["teacher_ids"],
                                           i["teacher_logprobs"], tail_coef=10.0,
                                           student_topm=case.k)
    torch.testing.assert_close(loss, want)
    ids = i["teacher_ids"]
    assert all(len(set(row.tolist())) == case.k for row in ids)  # distinct teacher ids
    assert bool((i["teacher_logprobs"].exp().sum(1) < 1).all())   # full-vocab normalised


def test_naive_topk_and_logprobs():
    case, i = _inputs("topk")
    ids, lps = ops.Naive(case, i).forward()
    full = torch.log_softmax(i["hidden"] @ i["weight"].T, dim=1)
    want = full.sort(dim=1, descending=True)
    torch.testing.assert_close(lps, want.values[:, :case.k])
    torch.testing.assert_close(full.gather(1, ids), lps)

    case, i = _inputs("logprobs")
    total = ops.Naive(case, i).forward()
    ce = F.cross_entropy(i["hidden"] @ i["weight"].T, i["token_ids"], reduction="sum")
    torch.testing.assert_close(total, -ce)


def test_naive_grpo_matches_the_formula():
    case, i = _inputs("grpo")
    loss = ops.Naive(case, i).forward()
    logp = torch.log_softmax(i["hidden"] @ i["weight"].T, 1).gather(1, i["token_ids"][:, None])[:, 0]
    # On-policy (old = current): ratio 1, so the surrogate is -A; plus k2 KL to the reference,
    # clamped to [-10, 10] per token as released (OpenRLHF's compute_approx_kl).
    k2 = (0.5 * (logp - i["ref_logprobs"]) ** 2).clamp(-10, 10)
    want = (-i["advantages"] + ops.KL_COEF * k2).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    g = torch.autograd.grad((-i["advantages"] * logp + ops.KL_COEF * (
        0.5 * (logp - i["ref_logprobs"]) ** 2).clamp(-10, 10)).mean(), i["hidden"])[0]
    torch.testing.assert_close(i["hidden"].grad, g)


@pytest.mark.parametrize("op", ["ckd", "logprobs", "grpo"])
def test_chunked_grad_in_forward_equals_naive(op):
    """The chunked variant's chunk loop (here with an uncompiled step, to stay fast)."""
    case, i = _inputs(op)
    loss = ops.Naive(case, i).forward()
    loss.backward()
    want = (loss.detach(), i["hidden"].grad.clone(), i["weight"].grad.clone())
    i["hidden"].grad = i["weight"].grad = None

    if op == "ckd":
        fn = ops._ckd_rows_m(case.k)
        rows, scale = (i["teacher_ids"], i["teacher_logprobs"]), 1.0 / case.n
    elif op == "logprobs":
        fn, rows, scale = ops.naive_logprobs_rows, (i["token_ids"],), 1.0
    else:
        fn, rows = ops.naive_grpo_rows, (i["token_ids"], i["advantages"], i["ref_logprobs"])
        scale = 1.0 / case.n
    step = torch.func.grad_and_value(ops._sum_rows(fn), argnums=(0, 1))
    got = ops._ChunkedGradInForward.apply(i["hidden"], i["weight"], step, 5, scale, *rows)
    got.backward()
    torch.testing.assert_close(got.to(want[0].dtype), want[0])
    torch.testing.assert_close(i["hidden"].grad, want[1])
    torch.testing.assert_close(i["weight"].grad, want[2])


def test_floor_is_the_three_products():
    case, i = _inputs("ckd")
    floor = ops.Floor(case, i)
    h, w, g = i["hidden"], i["weight"], floor.g
    logits = floor.forward()
    torch.testing.assert_close(logits, h @ w.T)
    gh, gw = floor.backward(logits)
    want_h, want_w = torch.autograd.grad((h @ w.T * g).sum(), (h, w))
    torch.testing.assert_close(gh, want_h)
    torch.testing.assert_close(gw, want_w)


def test_report_regenerates_readme_section(tmp_path):
    assert cli.main(["logprobs", "--preset", "smoke", "--n", "16", "--impls", "naive,floor",
                     "--no-isolate", "--repeats", "1", "--warmup", "0", "--no-memory",
                     "--out", str(tmp_path), "--name", "r", "--quiet", "--no-plots"]) == 0
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n" + report.BEGIN + "\nold\n" + report.END + "\n\ntail\n")
    project = tmp_path / "PROJECT.md"
    project.write_text("# p\n\n" + report.BEGIN + "\n" + report.END + "\n")
    args = ["--results", str(tmp_path), "--readme", str(readme), "--project-readme", str(project)]
    assert report.main(args + ["--check"]) == 1
    assert report.main(args) == 0
    assert "benchmarks/results/" in project.read_text()
    text = readme.read_text()
    assert "old" not in text and text.endswith("tail\n") and "naive (eager)" in text
    assert (tmp_path / "r_logprobs.png").exists()
    assert report.main(args + ["--check"]) == 0


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--preset" in out.stdout


def test_plot_marks_an_empty_memory_panel_instead_of_leaving_it_blank(tmp_path, monkeypatch):
    """At the smoke sizes every transient peak is 0 MiB: the memory panel says so."""
    pytest.importorskip("matplotlib")
    from benchmarks import report

    notes = []
    monkeypatch.setattr(report, "empty_panel_note", lambda ylabel: notes.append(ylabel) or "x")
    records = [{"op": "ckd", "impl": "naive", "label": "naive (eager)", "n": n, "h": 32,
                "v": 1000, "dtype": "float32", "time_ms": {"fwdbwd": {"median": 1.0 + n}},
                "mem_bytes": {"fwdbwd": 0}} for n in (64, 96)]
    data = {"env": {"device_name": "cpu"}, "records": records}
    (path,) = report.plot(data, tmp_path, "smoke")
    assert path.stat().st_size > 0
    assert len(notes) == 1 and "memory" in notes[0]
