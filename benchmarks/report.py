"""Markdown tables and PNG plots from benchmark JSON; regenerates the recorded results.

``python -m benchmarks.report`` reads every ``benchmarks/results/*.json``, writes each
one's ``.md`` and ``_<op>.png`` beside it, and rewrites the section of
``benchmarks/README.md`` between the ``results`` markers. ``--check`` only says
whether those files are up to date. No number is ever typed by hand.

``python -m benchmarks.report FILE.json ... --out DIR`` renders given files elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import ops, peers  # noqa: F401 - peers registers its rows into ops

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
PROJECT_README = HERE.parent / "README.md"
BEGIN, END = "<!-- results:begin (python -m benchmarks.report) -->", "<!-- results:end -->"

MODE_NAMES = {"fwd": "fwd", "bwd": "bwd", "fwdbwd": "fwd+bwd"}


def main_mode(op: str) -> str:
    return "fwd" if op in ops.FORWARD_ONLY else "fwdbwd"


def _ms(x) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f}"


def _cell_time(rec, mode):
    if mode in rec.get("errors", {}):
        return rec["errors"][mode].split(":")[0]
    t = rec.get("time_ms", {}).get(mode)
    return _ms(t and t["median"])


def _status(rec) -> str:
    if rec["status"] == "ok":
        return "ok" if not rec.get("errors") else "partly failed"
    return rec.get("message") or rec["status"]


def shape_groups(data: dict):
    groups: dict = {}
    for rec in data["records"]:
        key = (rec["op"], rec["h"], rec["n"], rec["v"], rec["k"], rec["dtype"])
        groups.setdefault(key, []).append(rec)
    return groups


def header(data: dict) -> str:
    env, cfg = data["env"], data["config"]
    cuda = env["device"].startswith("cuda")
    lines = [
        f"- device: **{env['device_name']}** ({env['device']}"
        + (f", {env.get('gpu_memory_gib')} GiB" if cuda else f", {env.get('cpu_count')} CPUs, "
           f"{env.get('torch_threads')} torch threads") + ")",
        f"- date: {env['date']}; torch {env['torch']}, triton {env.get('triton')}, "
        f"CUDA {env.get('cuda')}, python {env.get('python')}; star_kernels "
        f"{env.get('star_kernels')} (C++ backend built: {env.get('star_kernels_cpp_built')}); "
        f"liger-kernel {env.get('liger_kernel') or 'not installed'}; cut-cross-entropy "
        f"{env.get('cut_cross_entropy') or 'not installed'}",
        f"- command: `{env['command']}`" + (f" (git {env['git'].get('commit', '')[:10]}"
                                            f"{', dirty tree' if env['git'].get('dirty') else ''})"
                                            if env.get("git") else ""),
        "- timing: " + ("median of triton.testing.do_bench" if cuda else
                         f"median of {cfg['repeats']} runs after {cfg['warmup']} warm-up") +
        "; memory: transient peak (peak minus inputs and the gradients left in .grad)"
        + ("" if cuda else ", process peak RSS" + (" in a fresh process per row"
                                                   if cfg.get("isolate") else "")),
    ]
    if data.get("complete") is False:
        lines.append("- **incomplete run** (stopped before the end; rows not listed did not run)")
    return "\n".join(lines)


def markdown(data: dict, title: str | None = None) -> str:
    out = [f"## {title}" if title else "## Benchmark results", "", header(data), ""]
    notes: dict = {}
    for (op, h, n, v, k, dtype), recs in shape_groups(data).items():
        mode = main_mode(op)
        mname = MODE_NAMES[mode]
        out.append(f"### {op}: N={n:,}, H={h:,}, V={v:,}, k=m={k}, {dtype}")
        out.append("")
        if op in ops.FORWARD_ONLY:
            cols = ["implementation", "fwd ms", "x naive", "x floor", "transient MiB",
                    "mem x naive", "status"]
        else:
            cols = ["implementation", "fwd ms", "bwd ms", "fwd+bwd ms", f"{mname} x naive",
                    f"{mname} x floor", f"transient MiB ({mname})", "mem x naive", "status"]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for rec in recs:
            r = rec.get("ratios", {}).get(mode, {})
            times = [_cell_time(rec, m) for m in ops.modes_for(op)]
            row = [rec["label"], *times, _ratio(r.get("time_vs_naive")),
                   _ratio(r.get("time_vs_floor")), _mib(rec.get("mem_bytes", {}).get(mode)),
                   _ratio(r.get("mem_vs_naive")), _status(rec).replace("|", "/")]
            out.append("| " + " | ".join(row) + " |")
            notes[rec["label"]] = rec.get("note", "")
        out.append("")
        failed = [(rec["label"], m, e) for rec in recs for m, e in rec.get("errors", {}).items()]
        if failed:
            out.append("Failures: " + "; ".join(f"{lab} {MODE_NAMES[m]}: {e}" for lab, m, e in failed))
            out.append("")
    out.append("Rows: " + "; ".join(f"**{lab}**: {note}" for lab, note in notes.items() if note)
               + ". The floor's fwd is the logits GEMM, its bwd the two gradient GEMMs. "
               "Fused ops compute their gradients inside the forward, so compare fwd+bwd.")
    out.append("")
    return "\n".join(out)


def empty_panel_note(ylabel: str) -> str:
    """What a panel with nothing to draw says instead of standing empty."""
    if "memory" in ylabel:
        return ("no transient memory above 0 MiB was measured at these sizes\n"
                "(below the resolution of a process's peak RSS); see a larger preset")
    return "no timing was recorded for this mode"


def plot(data: dict, outdir: Path, stem: str) -> list[Path]:
    """One PNG per op: time and transient memory of the main mode vs N, per implementation."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    paths = []
    device = data["env"]["device_name"]
    for op in dict.fromkeys(rec["op"] for rec in data["records"]):
        mode = main_mode(op)
        recs = [r for r in data["records"] if r["op"] == op]
        hs = sorted({r["h"] for r in recs})
        styles = ["-", "--", ":", "-."]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        drew = False
        for impl in dict.fromkeys(r["impl"] for r in recs):
            for i, h in enumerate(hs):
                pts = sorted((r["n"], r.get("time_ms", {}).get(mode, {}).get("median"),
                              r.get("mem_bytes", {}).get(mode), r["label"])
                             for r in recs if r["impl"] == impl and r["h"] == h)
                label = pts[0][3] + (f" H={h}" if len(hs) > 1 else "") if pts else impl
                for ax, idx, scale in ((axes[0], 1, 1.0), (axes[1], 2, 2.0**-20)):
                    xy = [(p[0], p[idx] * scale) for p in pts if p[idx]]  # log axes: no zeros
                    if xy:
                        # tab20's ten dark hues first, then the light ones: every
                        # implementation keeps one distinct colour across plots.
                        idx = list(ops.IMPLS).index(impl)
                        color = plt.get_cmap("tab20")((2 * idx) % 20 + (2 * idx) // 20)
                        ax.plot(*zip(*xy), styles[i % len(styles)], marker="o", label=label,
                                color=color)
                        drew = True
        ns = sorted({r["n"] for r in recs})
        for ax, ylabel in ((axes[0], f"{MODE_NAMES[mode]} time (ms, median)"),
                           (axes[1], f"transient memory, {MODE_NAMES[mode]} (MiB)")):
            ax.set_xscale("log", base=2)
            # ticks at the measured sizes: with one or two sizes the automatic log ticks
            # land on powers of two that were never run
            ax.set_xticks(ns, [f"{n:,}" for n in ns])
            ax.set_xticks([], minor=True)
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.has_data():
                ax.set_yscale("log")
            else:  # e.g. the smoke preset: every transient peak rounds to 0 MiB
                ax.text(0.5, 0.5, empty_panel_note(ylabel), ha="center", va="center",
                        transform=ax.transAxes, fontsize=9, wrap=True)
        if drew:
            handles, labels = axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
        v = recs[0]["v"]
        fig.suptitle(f"{op}: V={v:,}, {recs[0]['dtype']}, {device}", fontsize=10)
        fig.tight_layout(rect=(0, 0.14, 1, 0.95))
        path = outdir / f"{stem}_{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(data: dict, outdir: Path, stem: str, plots: bool = True) -> list[Path]:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    js = outdir / f"{stem}.json"
    js.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    md = outdir / f"{stem}.md"
    md.write_text(markdown(data, title=stem) + "\n")
    return [js, md, *(plot(data, outdir, stem) if plots else [])]


def readme_section(files: list[Path], img_prefix: str = "results/") -> str:
    parts = [BEGIN, "",
             "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`; "
             "do not edit by hand.", ""]
    if not files:
        parts += ["No recorded runs yet.", ""]
    for path in files:
        data = json.loads(path.read_text())
        body = markdown(data, title=path.stem).replace("\n## ", "\n### ").replace(
            "\n### ", "\n#### ").replace("## " + path.stem, "### " + path.stem, 1)
        parts.append(body)
        for op in dict.fromkeys(r["op"] for r in data["records"]):
            parts.append(f"![{path.stem} {op}]({img_prefix}{path.stem}_{op}.png)")
        parts.append("")
    parts.append(END)
    return "\n".join(parts)


def regenerate(results: Path = RESULTS, readme: Path = README, check: bool = False,
               project_readme: Path = PROJECT_README) -> int:
    # Only microbenchmark runs (they hold "records"); other results (the curriculum
    # experiment, BFCL runs) are documented by their own .md files.
    files = [p for p in sorted(results.glob("*.json")) if "records" in json.loads(p.read_text())]
    stale = []
    for path in files:
        data = json.loads(path.read_text())
        md = path.with_suffix(".md")
        text = markdown(data, title=path.stem) + "\n"
        if not md.exists() or md.read_text() != text:
            stale.append(md)
            if not check:
                md.write_text(text)
        if not check:
            plot(data, results, path.stem)
    # The benchmarks README and the project README carry the same generated section.
    for path, prefix in ((readme, "results/"), (project_readme, "benchmarks/results/")):
        old = path.read_text() if path.exists() else ""
        section = readme_section(files, prefix)
        if BEGIN in old and END in old:
            new = old[:old.index(BEGIN)] + section + old[old.index(END) + len(END):]
        else:
            new = old.rstrip("\n") + "\n\n## Recorded results\n\n" + section + "\n"
        if new != old:
            stale.append(path)
            if not check:
                path.write_text(new)
    if check and stale:
        print("out of date: " + ", ".join(str(p) for p in stale), file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="JSON files to render (default: regenerate "
                   "benchmarks/results and the README section)")
    p.add_argument("--out", type=Path, help="folder for rendering given files")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--project-readme", type=Path, default=PROJECT_README)
    p.add_argument("--check", action="store_true", help="exit 1 if the generated files are stale")
    args = p.parse_args(argv)
    if not args.files:
        return regenerate(args.results, args.readme, args.check, args.project_readme)
    for path in args.files:
        data = json.loads(path.read_text())
        for out in write_outputs(data, args.out or path.parent, path.stem):
            print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
