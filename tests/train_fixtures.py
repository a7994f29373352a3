"""What the star_train tests share: the tiny Qwen3 model spec (the demo's), hand-written STAR records and
run-folder readers. Kept once here; the ``tokenizer`` fixture is in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from star_train.demo import tiny_qwen3  # noqa: F401  (the tiny model spec the tests share)

CITIES = ["Paris", "Lima", "Oslo", "Pune", "Kyiv", "Doha", "Bern"]
TEXT_ROWS = {2, 5}  # rows whose reference is a text reply; the others call get_weather


def weather_records() -> list[dict]:
    """Seven short STAR records over two tools (a JSON-schema and a flat one)."""
    weather = {"name": "get_weather", "description": "Current weather for a city.",
               "parameters": {"type": "object", "properties": {
                   "city": {"type": "string", "description": "City name"},
                   "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}
    add = {"name": "add", "description": "Add two integers.",
           "parameters": {"a": {"type": "int"}, "b": {"type": "int"}}}
    rows = []
    for i, city in enumerate(CITIES):
        if i in TEXT_ROWS:
            last = {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."}
        else:
            last = {"role": "assistant", "content": None, "reasoning_content": f"In {city}.",
                    "tool_calls": [{"name": "get_weather", "arguments": {"city": city}}]}
        rows.append({"id": f"row-{i}", "tools": [weather, add], "messages": [
            {"role": "user", "content": f"What is the weather in {city}? Also {i} + {i + 1}?"},
            last]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def log_lines(out_dir) -> list[dict]:
    """The ``train_log.jsonl`` records of a run folder."""
    return [json.loads(line) for line in open(Path(out_dir) / "train_log.jsonl")]


def weights(model_dir) -> dict:
    return load_file(str(Path(model_dir) / "model.safetensors"))
