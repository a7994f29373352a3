#!/usr/bin/env bash
# One command for a bare GPU machine without network: GPU tests, then every benchmark
# at a reduced set of shapes, then training steps at the Qwen3-0.6B shape, in under
# 9 minutes on an H100.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Installs nothing from the network. Extra wheels (liger-kernel, cut-cross-entropy, veomni,
# optionally matplotlib and its dependencies) are taken from ./.whl/ if present and
# installed into a scratch folder on PYTHONPATH. Writes into OUTDIR (9 files):
#   gpu-check.json   every measurement with device, versions, date and command
#   gpu-check.md     the markdown tables (ratios to naive and to the bare GEMMs)
#   gpu-check_<op>.png  time and memory vs N per implementation (needs matplotlib;
#                    otherwise regenerate on any machine: python -m benchmarks.report OUTDIR/gpu-check.json)
#   roofline-model.{json,md}  the roofline model's prediction for the CKD shape (a model)
#   log.txt          environment, pytest output, benchmark progress
#   train-steps-qwen3-0.6b.{json,md}  CKD and Sim-RL steps at the Qwen3-0.6B shape: peak memory, tokens/s
# Knobs (environment): BENCH_BUDGET_S (seconds for the benchmarks, default 270),
# TRAIN_TIMEOUT_S (the training steps, default 150),
# TEST_TIMEOUT_S (pytest, default 150), BENCH_ARGS (extra arguments for python -m benchmarks),
# BENCH_SKIP (rows to skip, default the CPU-only FKL rows star_torch_fkl,star_cpp_fkl).
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/log.txt"
PY=${PYTHON:-python}
START=$(date +%s)
BENCH_BUDGET_S=${BENCH_BUDGET_S:-270}
TRAIN_TIMEOUT_S=${TRAIN_TIMEOUT_S:-150}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-150}
: > "$LOG"
say() { echo "== $* ($(( $(date +%s) - START )) s)" | tee -a "$LOG"; }

SITE=/tmp/star-bench-site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    say "installing carried wheels: $(ls .whl | tr '\n' ' ')"
    $PY -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >> "$LOG" 2>&1 \
        || say "some wheels did not install (see above); continuing"
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH#$PWD}"
fi

say "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -V
    $PY - <<'PY' 2>&1
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for m in ("triton", "liger_kernel", "cut_cross_entropy", "matplotlib", "star_kernels"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as exc:
        print(m, "NOT importable:", type(exc).__name__, exc)
PY
} >> "$LOG" 2>&1

say "GPU tests: pytest -m gpu (timeout ${TEST_TIMEOUT_S}s)"
timeout "$TEST_TIMEOUT_S" $PY -m pytest -q -m gpu tests -p no:cacheprovider \
    --continue-on-collection-errors >> "$LOG" 2>&1  # a module needing a missing extra must not stop the rest
say "pytest exit code $?"

say "roofline model (predicted, not measured) for comparison"
$PY -m benchmarks.roofline --out "$OUT" --name roofline-model >> "$LOG" 2>&1

say "benchmarks (budget ${BENCH_BUDGET_S}s)"
# The FKL-only rows of our torch/cpp backends are CPU comparisons; on the GPU the
# triton FKL row is the one to set beside VeOmni and Liger's KL div.
SKIP=${BENCH_SKIP:-star_torch_fkl,star_cpp_fkl}
# The budget stops starting new rows; the hard timeout leaves 90 s for one slow row.
timeout $(( BENCH_BUDGET_S + 90 )) $PY -m benchmarks all --preset gpu-check \
    --time-budget "$BENCH_BUDGET_S" --out "$OUT" --name gpu-check --skip "$SKIP" ${BENCH_ARGS:-} \
    >> "$LOG" 2>&1
rc=$?
say "benchmarks exit code $rc"
if [ $rc -ne 0 ] && [ -f "$OUT/gpu-check.json" ]; then
    # Killed part-way: render what was written so far.
    $PY -m benchmarks.report "$OUT/gpu-check.json" --out "$OUT" >> "$LOG" 2>&1
fi

say "training steps at the Qwen3-0.6B shape (random weights, bf16, checkpointing, packed; timeout ${TRAIN_TIMEOUT_S}s)"
# CKD stage steps and the Sim-RL update pass: peak memory and tokens/s beside the arithmetic.
timeout "$TRAIN_TIMEOUT_S" $PY -m benchmarks.train_steps --shape qwen3-0.6b --device cuda \
    --out "$OUT" >> "$LOG" 2>&1
say "training steps exit code $?"
say "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
