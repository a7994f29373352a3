"""Training steps at a real model's shape: measured peak memory and tokens/s beside the arithmetic.

    python -m benchmarks.train_steps --shape qwen3-0.6b --device cuda --out DIR   # gpu_check.sh
    python -m benchmarks.train_steps --shape tiny --device cpu --out DIR          # the same path, toy size

The README's one-GPU memory figures are arithmetic; this measures them. Both parts run
star_train's own training skeleton (``runtime.trainer.Trainer``) on random weights built
from the shape's config (nothing is downloaded), bf16 autocast over fp32 parameters and
AdamW, gradient checkpointing, packed micro-batches (``train.packing``), and read the
per-step ``peak_memory_gib`` and ``tokens_per_s`` from the run's ``train_log.jsonl``:

* ``ckd``: the CKD stage itself (``run_ckd``) on the packaged sample rows, with a teacher of
  the same shape (another seed) whose top-k cache is built first and freed;
* ``simrl-loss``: the Sim-RL update pass (policy + frozen bf16 reference, fused GRPO loss
  on the completion tokens only, reference log-probs recorded before the step), on
  synthetic completions of ``--completion-tokens`` after the sample rows' real prompts;
  sampling itself is not timed (its memory is the KV cache, see the README).

The first step includes allocator warm-up; the summary takes the median over the later
steps. Output: ``train-steps-<shape>.json`` and ``.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import star_kernels as sk
from star_train.chat.tokenizer import qwen3_tokenizer
from star_train.data.examples import load_examples, pack_batch
from star_train.runtime.config import ModelSpec, TrainConfig, from_dict
from star_train.runtime.models import load_model, predicting_rows
from star_train.runtime.trainer import StepPlan, Trainer
from star_train.stages.ckd import CKDRunConfig, run_ckd

SAMPLE_ROWS = Path(__file__).resolve().parents[1] / "star_train" / "assets" / "xlam_sample.jsonl"

QWEN3_06B = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
             "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
SHAPES = {
    "qwen3-0.6b": {"config": QWEN3_06B, "batch_size": 16, "micro_batch_size": 4, "steps": 4,
                   "rows": 64},
    "tiny": {"config": {**QWEN3_06B, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "head_dim": 8, "max_position_embeddings": 2048},
             "batch_size": 4, "micro_batch_size": 2, "steps": 3, "rows": 8},
}
GIB = 2**30


def arithmetic(config: dict, parameters: int) -> dict:
    """The README's arithmetic: fp32 weights, gradients and AdamW moments = 16 bytes per
    parameter; Sim-RL adds the frozen reference in bf16 (2 bytes per parameter)."""
    return {"parameters": parameters, "weights_grads_adam_gib": round(16 * parameters / GIB, 3),
            "reference_bf16_gib": round(2 * parameters / GIB, 3)}


def _train_keys(shape: dict, device: str, dtype: str, out: Path) -> dict:
    return {"out_dir": str(out), "lr": 1e-6, "batch_size": shape["batch_size"],
            "micro_batch_size": shape["micro_batch_size"], "dtype": dtype, "device": device,
            "packing": True, "max_steps": shape["steps"], "save_every": 10_000, "log_every": 1,
            "loss_normalization": "step_tokens", "warmup_ratio": 0.0}


def ckd_steps(shape: dict, device: str, dtype: str, work: Path, log) -> list[dict]:
    cfg = from_dict(CKDRunConfig, {
        "data": {"path": str(SAMPLE_ROWS), "format": "template", "max_length": 2048,
                 "limit": shape["rows"]},
        "teacher": {"model": {"config": shape["config"], "seed": 1}, "k": 100, "batch_size": 4,
                    "shard_size": 64},
        "student": {"model": {"config": shape["config"], "seed": 0}, "gradient_checkpointing": True},
        "train": {**_train_keys(shape, device, dtype, work / "ckd"), "epochs": 4}})
    run_ckd(cfg, tokenizer=qwen3_tokenizer(), log=log)
    return [json.loads(line) for line in open(work / "ckd" / "train_log.jsonl")]


class GRPOLossStage:
    """Sim-RL's update pass on fixed synthetic completions (the Trainer's Stage protocol):
    reference log-probs recorded with a frozen bf16 copy first, then the fused GRPO loss."""

    name = "simrl-loss"

    def __init__(self, trainer: Trainer, reference, sequences: list, shape: dict):
        self.trainer, self.sequences, self.shape = trainer, sequences, shape
        self.total_steps = self.planned_steps = shape["steps"]
        self.run_key = {}
        micro = shape["micro_batch_size"]
        self.groups = [list(range(i, min(i + micro, len(sequences)))) for i in range(0, len(sequences), micro)]
        self.tokens = [sum(int(sequences[i][1].sum()) for i in g) for g in self.groups]
        self.reference_logprobs = []
        with torch.no_grad(), trainer.autocast():
            for group in self.groups:
                rows, ids, weight, bias = predicting_rows(reference, self._batch(group), trainer.device)
                self.reference_logprobs.append(sk.fused_linear_logprobs(rows, weight, ids, bias=bias).float())
        generator = torch.Generator().manual_seed(0)
        self.advantages = [torch.randn(n, generator=generator).to(trainer.device) for n in self.tokens]

    def _batch(self, group):
        return pack_batch([self.sequences[i] for i in group])

    def plan_step(self, step):
        return StepPlan(list(range(len(self.groups))), sum(self.tokens), micro_tokens=self.tokens)

    def micro_loss(self, model, g):
        rows, ids, weight, bias = predicting_rows(model, self._batch(self.groups[g]), self.trainer.device)
        loss, _ = sk.fused_linear_grpo_loss(rows, weight, ids, self.advantages[g],
                                            torch.ones_like(ids, dtype=torch.bool),
                                            ref_logprobs=self.reference_logprobs[g], kl_coef=1e-3,
                                            bias=bias, loss_agg="token_mean")
        return loss * ids.numel(), {}

    def state(self):
        return {}

    def restore(self, state):
        pass

    def describe(self, record):
        return f"loss {record['loss']:.4f}"


def simrl_steps(shape: dict, device: str, dtype: str, completion_tokens: int, work: Path, log) -> list[dict]:
    tokenizer = qwen3_tokenizer()
    examples = load_examples(str(SAMPLE_ROWS), tokenizer, max_length=2048, limit=shape["batch_size"],
                             fmt="template")
    generator = torch.Generator().manual_seed(0)
    sequences = []
    for ex in examples:  # the real prompt, then a synthetic completion of fixed length
        prompt = ex.input_ids[ex.labels == -100] if (ex.labels == -100).any() else ex.input_ids[:1]
        completion = torch.randint(0, 151_000, (completion_tokens,), generator=generator, dtype=prompt.dtype)
        ids = torch.cat([prompt, completion])
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[len(prompt):] = True
        sequences.append((ids, mask))
    (work / "simrl-loss").mkdir(parents=True)
    keys = _train_keys(shape, device, dtype, work / "simrl-loss")
    train = TrainConfig(**{k: v for k, v in keys.items() if k not in ("batch_size", "packing")})
    spec = ModelSpec(config=shape["config"], seed=0)
    trainer = Trainer(train, spec, work / "simrl-loss", tokenizer=tokenizer, gradient_checkpointing=True, log=log)
    reference = load_model(spec, torch.bfloat16, trainer.device).eval().requires_grad_(False)
    trainer.fit(GRPOLossStage(trainer, reference, sequences, shape))
    return [json.loads(line) for line in open(work / "simrl-loss" / "train_log.jsonl")]


def summarise(records: list[dict]) -> dict:
    later = records[1:] or records
    peaks = [r["peak_memory_gib"] for r in records if "peak_memory_gib" in r]
    return {"steps": len(records), "tokens_per_step": later[0]["tokens"],
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in later),
            "peak_memory_gib_max": max(peaks) if peaks else None,
            "seconds_per_step_median": statistics.median(r["seconds"] for r in later)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_steps", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--completion-tokens", type=int, default=512)
    parser.add_argument("--parts", default="ckd,simrl-loss")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    shape, out = SHAPES[args.shape], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = shape["config"]
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):  # the parameter count without allocating the weights
        parameters = sum(p.numel() for p in Qwen3ForCausalLM(Qwen3Config(**config)).parameters())
    result = {"command": "python -m benchmarks.train_steps " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or platform.machine(),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "shape": args.shape, "config": config, "dtype": args.dtype,
              "settings": {k: v for k, v in shape.items() if k != "config"},
              "arithmetic": arithmetic(config, parameters), "parts": {}}
    log = print
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            began = time.perf_counter()
            if part == "ckd":
                records = ckd_steps(shape, args.device, args.dtype, Path(tmp), log)
            elif part == "simrl-loss":
                records = simrl_steps(shape, args.device, args.dtype, args.completion_tokens, Path(tmp), log)
            else:
                raise SystemExit(f"--parts: unknown part {part!r} (ckd, simrl-loss)")
            result["parts"][part] = {**summarise(records), "records": records,
                                     "wall_s": round(time.perf_counter() - began, 1)}
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    stem = out / f"train-steps-{args.shape}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    a = result["arithmetic"]
    lines = [f"# Training steps at the {result['shape']} shape ({result['device']}, {result['dtype']} autocast)",
             "", f"Command: `{result['command']}` ({result['date']}, torch {result['torch']}).",
             f"Arithmetic: {a['parameters']:,} parameters; fp32 weights + grads + AdamW = "
             f"{a['weights_grads_adam_gib']} GiB; Sim-RL's bf16 reference {a['reference_bf16_gib']} GiB.", "",
             "| part | steps | tokens/step | tokens/s (median) | s/step | peak memory GiB |",
             "|---|---|---|---|---|---|"]
    for name, p in result["parts"].items():
        peak = "n/a (CPU)" if p["peak_memory_gib_max"] is None else p["peak_memory_gib_max"]
        lines.append(f"| {name} | {p['steps']} | {p['tokens_per_step']} | {p['tokens_per_s_median']:,.0f} | "
                     f"{p['seconds_per_step_median']:.2f} | {peak} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
