"""Score one model: BFCL v3 (star_train.eval.bfcl's public API) and the held-out rows' reward.

Both use the Qwen3 tool layout rendered as text for SmolLM2's own tokenizer (SmolLM2's
chat template has no tools), greedy decoding, the prompt ending inside the think block as
STAR trains. Held-out rows: the completion is scored with ``star_train.reward``'s
``similarity_reward`` against the row's answer (-1 malformed, else [0, 1]).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from star_train.chat.qwen3 import THINK_OPEN
from star_train.data.records import build_example, load_records
from star_train.eval.bfcl import evaluate, hf_generate_fn
from star_train.reward import similarity_reward
from star_train.runtime.config import ModelSpec
from star_train.runtime.models import load_model, load_tokenizer

CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")


def heldout_scores(model, tokenizer, records: list, *, max_new_tokens: int, batch_size: int) -> dict:
    generate = hf_generate_fn(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size)
    prompts = [build_example(record)[0] for record in records]
    completions = generate(prompts)
    rewards = [similarity_reward(THINK_OPEN + completion, record["messages"][-1], record["tools"])
               for completion, record in zip(completions, records)]
    calls = sum(1 for completion in completions if "<tool_call>" in completion)
    return {"reward_mean": sum(rewards) / len(rewards),
            "reward_mean_valid_as_0": sum(max(r, 0.0) for r in rewards) / len(rewards),
            "malformed_fraction": sum(r == -1.0 for r in rewards) / len(rewards),
            "call_fraction": calls / len(rewards), "rows": len(rewards),
            "rewards": rewards, "completions": completions}


def _bfcl_category(model, tokenizer, category: str, stem: Path, ev: dict) -> dict:
    """One category's ``evaluate`` summary, cached in ``<stem>.json`` (a resumed run skips it)."""
    summary_path = stem.with_suffix(".json")
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    summary = evaluate(model, tokenizer, [category], ev["bfcl_limit"], max_new_tokens=ev["max_new_tokens"],
                       batch_size=ev["batch_size"], results_path=stem.with_suffix(".jsonl"))
    _write_json(summary_path, summary)
    return summary


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False))
    tmp.rename(path)


def evaluate_variant(name: str, model_dir: str, heldout_path: Path, out_dir: Path, ev: dict,
                     device: str, log=print) -> dict:
    """Scores of the model in ``model_dir``, cached in ``out_dir/<name>.json``."""
    path = out_dir / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    model = load_model(ModelSpec(path=model_dir), torch.float32, torch.device(device)).eval()
    tokenizer = load_tokenizer(model_dir)
    bfcl = {category: _bfcl_category(model, tokenizer, category, out_dir / f"{name}-bfcl-{category}", ev)
            for category in CATEGORIES}
    bfcl_seconds = time.perf_counter() - began
    heldout = heldout_scores(model, tokenizer, load_records(heldout_path),
                             max_new_tokens=ev["max_new_tokens"], batch_size=ev["batch_size"])
    result = {"variant": name, "model_dir": model_dir,
              "parameters": sum(p.numel() for p in model.parameters()),
              "layers": model.config.num_hidden_layers,
              "bfcl": {c: bfcl[c]["categories"][c] for c in CATEGORIES},
              "bfcl_mean_accuracy": sum(bfcl[c]["overall_accuracy"] for c in CATEGORIES) / len(CATEGORIES),
              "bfcl_source": {c: bfcl[c]["source"] for c in CATEGORIES},
              "heldout": heldout, "seconds": round(time.perf_counter() - began, 1),
              "bfcl_seconds": round(bfcl_seconds, 1)}
    _write_json(path, result)
    log(f"{name}: BFCL mean {result['bfcl_mean_accuracy']:.3f} "
        f"{ {c: v['accuracy'] for c, v in result['bfcl'].items()} }  held-out reward "
        f"{heldout['reward_mean']:.3f}  ({result['seconds']:.0f}s)")
    return result
