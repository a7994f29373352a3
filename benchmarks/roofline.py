"""Roofline model of the fused lm_head ops: ``python -m benchmarks.roofline``.

A model, not a measurement. For a GPU given by its peak dense bf16 tensor rate and its
memory bandwidth it predicts the time of each part of an op at one shape, and the
ratio to the bare-GEMM floor (the benchmarks' ``floor`` row: ``logits = h @ W.T``,
``grad_h = G @ W``, ``grad_W = G.T @ h`` on the whole ``[N, V]``):

- the three GEMMs per chunk of rows (``_chunked``): each costs
  ``max(flops / peak, bytes / bandwidth)``, its bytes being its operands and output;
- the row kernel: ``rows x V x bytes per logit x (passes reading the row + passes
  writing it)``, at full bandwidth, with the pass counts of the Triton kernels as
  written (``ROW_PASSES``; ``tests/test_triton_rows_edge.py`` counts the CKD kernel's
  passes and checks them against this table);
- the weight-gradient accumulation: a bf16 ``[V, H]`` partial per chunk added to an
  fp32 accumulator (read fp32 + read bf16 + write fp32), or an fp32-output GEMM that
  accumulates in place (its C read and written inside the GEMM's own roofline);
- the final weight gradient: scaled by ``grad_out`` and cast to the parameter dtype
  in two passes (read fp32, write fp32; read fp32, write bf16) or one.

Scenarios: ``start`` is the code as it was when issue 11 was filed (CKD row read 4
times and written once for 16-bit logits, bf16 partial weight gradients, two final
passes); ``row3`` only changes the CKD row kernel (3 reads + 1 write, issue 11 item 6);
``exact`` is the CKD row kernel since |M| = m exactly (issue 12 item 1): ``row3`` plus
the pass that counts ties at the m-th value per block, on every row (an upper bound:
ties are cut on 85% of SmolLM2-135M's bf16 rows at m = 100, rarely in fp32; the one
block bisected after it is not counted); ``target`` adds to ``exact`` an
fp32-accumulating weight-gradient GEMM and one final pass (items 3 and 4 of issue 11).
Not modelled: launch overheads, the row kernel's compute (exp, histograms),
L2 reuse, the GEMMs' real efficiency (``--gemm-eff`` scales the peak rate).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Dense bf16 tensor-core rate with fp32 accumulation (TFLOP/s, no sparsity) and memory
# bandwidth (TB/s), from the vendors' data sheets.
GPUS = {
    "H100": (989.0, 3.35),        # H100 SXM5 80 GB
    "H200": (989.0, 4.8),         # H200 SXM 141 GB
    "A100": (312.0, 2.039),       # A100 SXM4 80 GB
    "RTX 4090": (165.2, 1.008),   # bf16 with fp32 accumulate (330 with fp16 accumulate)
    "RTX 3090": (71.0, 0.936),
}

# Full passes over a row of logits per op and dtype class: (reads, writes), from the
# kernels' docstrings (star_kernels/_triton_*.py). fp32 gives the most a row can take.
ROW_PASSES = {
    "start": {
        "ckd": {"16-bit": (4, 1), "fp32": (6, 1)},   # lse+hist, refine(s), mass, grad
        "logprobs": {"16-bit": (2, 1), "fp32": (2, 1)},
        "topk": {"16-bit": (5, 0), "fp32": (5, 0)},  # lse+hist, 3 refines, gather
    },
    "row3": {
        "ckd": {"16-bit": (3, 1), "fp32": (5, 1)},   # mass folded into the select
        "logprobs": {"16-bit": (2, 1), "fp32": (2, 1)},
        "topk": {"16-bit": (5, 0), "fp32": (5, 0)},
    },
    # _triton_ckd step 4: one more read of the row counts the ties per block when more
    # ids tie at the m-th value than M has room for. A cut needs the select to reach its
    # last level, so in fp32 it is 4 select passes + the tie pass + the gradient pass.
    "exact": {
        "ckd": {"16-bit": (4, 1), "fp32": (6, 1)},
        "logprobs": {"16-bit": (2, 1), "fp32": (2, 1)},
        "topk": {"16-bit": (5, 0), "fp32": (5, 0)},
    },
}
ROW_PASSES["target"] = ROW_PASSES["exact"]  # the row kernel as it is, the rest improved
SCENARIOS = {  # (row passes, fp32-accumulating weight-gradient GEMM, one final pass)
    "start": ("start", False, False),
    "row3": ("row3", False, False),
    "exact": ("exact", False, False),
    "target": ("target", True, True),
}
OP_ROWS = {"ckd": "ckd", "grpo": "logprobs", "logprobs": "logprobs", "topk": "topk"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Shape:
    op: str = "ckd"
    n: int = 8192
    h: int = 1024
    v: int = 151_936
    dtype: str = "bfloat16"
    memory_budget: int = 512 << 20   # CUDA default chunk budget (_backends)


def _gemm_ms(flops, nbytes, peak, bw):
    return max(flops / peak, nbytes / bw) * 1e3


def predict(shape: Shape, gpu: str, scenario: str, gemm_eff: float = 1.0) -> dict:
    """Predicted milliseconds per part, their total and the ratio to the floor."""
    tflops, tbs = GPUS[gpu]
    peak, bw = tflops * 1e12 * gemm_eff, tbs * 1e12
    n, h, v, b = shape.n, shape.h, shape.v, DTYPE_BYTES[shape.dtype]
    rows_key, fp32_acc, one_final = SCENARIOS[scenario]
    reads, writes = ROW_PASSES[rows_key][OP_ROWS[shape.op]][
        "fp32" if b == 4 else "16-bit"]
    train = shape.op != "topk"
    chunk = max(1, min(n, shape.memory_budget // (v * b)))
    chunks = [min(chunk, n - s) for s in range(0, n, chunk)]
    vh = v * h
    parts = {"logits GEMM": 0.0, "row kernel": 0.0}
    if train:
        parts.update({"grad_h GEMM": 0.0, "grad_W GEMM": 0.0, "grad_W accumulation": 0.0,
                      "grad_W final": 0.0})
    for c in chunks:
        logits = c * v * b
        parts["logits GEMM"] += _gemm_ms(2 * c * v * h, c * h * b + vh * b + logits, peak, bw)
        parts["row kernel"] += logits * (reads + writes) / bw * 1e3
        if not train:
            continue
        parts["grad_h GEMM"] += _gemm_ms(2 * c * v * h, logits + vh * b + c * h * b, peak, bw)
        if fp32_acc:   # C (fp32) read and written by the GEMM itself
            parts["grad_W GEMM"] += _gemm_ms(2 * c * v * h, logits + c * h * b + 8 * vh,
                                             peak, bw)
        else:          # bf16 partial written, then acc(fp32) += partial
            parts["grad_W GEMM"] += _gemm_ms(2 * c * v * h, logits + c * h * b + vh * b,
                                             peak, bw)
            parts["grad_W accumulation"] += (4 + b + 4) * vh / bw * 1e3
    if train:
        final = (4 + b) if one_final else (4 + 4) + (4 + b)
        parts["grad_W final"] = final * vh / bw * 1e3
    floor = _gemm_ms(2 * n * v * h, n * h * b + vh * b + n * v * b, peak, bw)
    if train:
        floor += 2 * _gemm_ms(2 * n * v * h, n * v * b + vh * b + n * h * b, peak, bw)
    total = sum(parts.values())
    return {"gpu": gpu, "scenario": scenario, **asdict(shape), "chunk_rows": chunk,
            "chunks": len(chunks), "row_reads": reads, "row_writes": writes,
            "parts_ms": {k: round(t, 3) for k, t in parts.items()},
            "total_ms": round(total, 3), "floor_ms": round(floor, 3),
            "ratio_to_floor": round(total / floor, 3)}


def table(results: list[dict]) -> str:
    parts = list(results[0]["parts_ms"])
    head = ["GPU", "scenario", "row passes (r+w)", *[f"{p} ms" for p in parts],
            "total ms", "floor ms", "x floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["gpu"], r["scenario"], f"{r['row_reads']}+{r['row_writes']}",
                 *[f"{r['parts_ms'][p]:.2f}" for p in parts],
                 f"{r['total_ms']:.2f}", f"{r['floor_ms']:.2f}", f"{r['ratio_to_floor']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=sorted(OP_ROWS), default="ckd")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--v", type=int, default=151_936)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    p.add_argument("--gpus", default=",".join(GPUS), help="comma-separated, from: "
                   + ", ".join(GPUS))
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--gemm-eff", type=float, default=1.0,
                   help="fraction of the peak rate the GEMMs reach (default 1.0)")
    p.add_argument("--memory-budget", type=int, default=512 << 20)
    p.add_argument("--out", help="folder for NAME.json and NAME.md")
    p.add_argument("--name", default="roofline")
    args = p.parse_args(argv)
    shape = Shape(args.op, args.n, args.h, args.v, args.dtype, args.memory_budget)
    results = [predict(shape, g.strip(), s.strip(), args.gemm_eff)
               for s in args.scenarios.split(",") for g in args.gpus.split(",")]
    title = (f"Roofline MODEL (predicted, not measured): {shape.op} N={shape.n:,} "
             f"H={shape.h:,} V={shape.v:,} {shape.dtype}, chunk {results[0]['chunk_rows']} "
             f"rows x {results[0]['chunks']}, GEMMs at {args.gemm_eff:g} x peak")
    text = f"{title}\n\n{table(results)}\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "model (roofline prediction), not a measurement",
                "command": "python -m benchmarks.roofline "
                           + " ".join(sys.argv[1:] if argv is None else argv),
                "date": _dt.date.today().isoformat(), "gpus": {
                    g: {"bf16_tflops": GPUS[g][0], "tb_per_s": GPUS[g][1]} for g in GPUS},
                "row_passes": ROW_PASSES, "gemm_eff": args.gemm_eff}
        (out / f"{args.name}.json").write_text(json.dumps(
            {**meta, "results": results}, indent=1) + "\n")
        (out / f"{args.name}.md").write_text(
            f"# {title}\n\nThis is the output of a model, not a measurement: "
            "`python -m benchmarks.roofline` (see its docstring for what it counts).\n\n"
            f"{table(results)}\n")
    return 0 if all(math.isfinite(r["total_ms"]) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
