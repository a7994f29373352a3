"""Source rows -> STAR records, as the released ``format_data.py`` converts them.

Each converter takes the source's rows (dicts, as read from its jsonl) and returns
``(records, problems)``: the converted records and, for every row or turn it skipped,
``(where, reason)`` (the released script prints those and goes on). Where the released
script would stop with an exception (a ToolMind system message, a tool spec without a
name), the row is skipped and reported instead.

Source schemas (from the released converters and the datasets' cards):

* xLAM: ``{"id": int, "query": str, "answers": JSON string of [{"name", "arguments"}],
  "tools": JSON string of [{"name", "description", "parameters": {param: {"type",
  "description", "default"}}}]}``. One record per row: the query, then the answers as the
  assistant's calls (None when empty).
* ToolACE (Qwen-cleaned): ``{"tools": [...] or its JSON string, "conversations": [...] or
  its JSON string}``, turns ``{"role": "user" | "assistant" | "tool", "content",
  "tool_calls": [{"function": {"name", "arguments": JSON string}}]}``. One record per
  assistant turn, its history before it; consecutive tool-call turns are merged into one
  parallel answer. A called name missing from the tools is replaced by the first tool
  name containing it; an argument must be a key of the tool's ``parameters`` (the
  released check reads the spec's own keys).
* ToolMind (graphsyn): ``{"conversations": [{"role", "content", "tool_calls":
  [{"function": {"name", "arguments"}}]}], "tools": [{"type": "function", "function":
  {"name", "description", "parameters" | "arguments"}}], ...}``. An assistant's
  ``<think>...</think>`` in content becomes ``reasoning_content``; other row fields are
  kept; ids ``toolmind_<i>``.
* Hammer: ``{"trace_id", "functions": [{"name", "description", "parameters"}],
  "messages": [{"role", "content"}], "expected_output": str}``: irrelevance cases, whose
  answer is the text ``expected_output``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a jsonl file, blank lines skipped."""
    rows = []
    with open(Path(path), encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number}: not valid JSON ({error})") from None
    return rows


def sample_rows(rows: list, size: int, seed: int) -> list:
    """``format_data.py --dataset_size``: a seeded ``random.sample`` of ``size`` rows taken
    before conversion (all rows, in order, when ``size`` is 0 or not below their count)."""
    if not size or size >= len(rows):
        return list(rows)
    return random.Random(seed).sample(list(rows), size)


def _json_or_value(value):
    return json.loads(value) if isinstance(value, str) else value


# ---------------------------------------------------------------- xLAM

def convert_xlam(rows: list[dict]) -> tuple[list[dict], list]:
    records, problems = [], []
    for row in rows:
        where = f"xlam_{row.get('id')}"
        try:
            tools = [{"name": tool["name"], "parameters": tool.get("parameters", {}),
                      "description": tool.get("description", "")}
                     for tool in _json_or_value(row["tools"])]
            answers = _json_or_value(row["answers"])
            records.append({"id": where, "tools": tools, "messages": [
                {"role": "user", "content": row["query"]},
                {"role": "assistant", "content": None, "tool_calls": answers or None}]})
        except (KeyError, TypeError, ValueError) as error:
            problems.append((where, f"{type(error).__name__}: {error}"))
    return records, problems


# ---------------------------------------------------------------- ToolACE

def _closest_tool_name(name: str, names: list[str]) -> str:
    for candidate in names:
        if name in candidate:
            return candidate
    raise ValueError(f"Tool {name} not found in {names}")


def _toolace_calls(raw_calls: list, tools: list) -> list[dict]:
    """The turn's calls, names repaired and arguments checked as released."""
    names = [tool["name"] for tool in tools]
    by_name = {tool["name"]: tool for tool in tools}
    calls = []
    for item in raw_calls:
        call = dict(item["function"])
        if call["name"] not in names:
            call["name"] = _closest_tool_name(call["name"], names)
        arguments = call["arguments"]
        if not isinstance(arguments, dict):
            arguments = json.loads(arguments)
            call["arguments"] = arguments
        for key in arguments:
            if key not in by_name[call["name"]]["parameters"]:
                raise ValueError(f"Argument {key} not found in {call['name']}")
        calls.append(call)
    return calls


def convert_toolace(rows: list[dict]) -> tuple[list[dict], list]:
    records, problems = [], []
    for i, row in enumerate(rows):
        try:
            tools = _json_or_value(row["tools"])
            turns = _json_or_value(row["conversations"])
            history, parallel = [], []
            for j, turn in enumerate(turns):
                where = f"toolace-{i}-{j}"
                role = turn["role"]
                if role == "user" and turn.get("content"):
                    history.append({"role": "user", "content": turn["content"]})
                elif role == "tool":
                    content = turn["content"]
                    if not isinstance(content, str):
                        content = json.dumps(content, ensure_ascii=False)
                    history.append({"role": "tool", "content": content})
                elif role == "assistant" and turn.get("content"):
                    answer = {"role": "assistant", "content": turn["content"]}
                    records.append({"id": where, "messages": history + [answer], "tools": tools})
                    history.append(dict(answer))
                elif role == "assistant" and turn.get("tool_calls"):
                    try:
                        parallel.extend(_toolace_calls(turn["tool_calls"], tools))
                    except ValueError as error:
                        problems.append((where, str(error)))
                        continue
                    if j == len(turns) - 1 or not turns[j + 1].get("tool_calls"):
                        answer = {"role": "assistant", "tool_calls": parallel}
                        records.append({"id": where, "messages": history + [answer],
                                        "tools": tools})
                        history.append(dict(answer))
                        parallel = []
                elif role == "assistant":
                    problems.append((where, f"unexpected message: {turn}"))
                else:
                    problems.append((where, f"unexpected role: {role}"))
        except (KeyError, TypeError, ValueError) as error:
            problems.append((f"toolace-{i}", f"{type(error).__name__}: {error}"))
    return records, problems


# ---------------------------------------------------------------- ToolMind

def _plain_tool(tool: dict) -> dict:
    while "type" in tool and "function" in tool:
        tool = tool["function"]
    tool = dict(tool)
    if "name" not in tool:
        raise ValueError("Invalid tool: missing name field")
    if "parameters" not in tool:
        if "arguments" not in tool:
            raise ValueError("Invalid tool: missing parameters field")
        tool["parameters"] = tool.pop("arguments")
    return tool


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def _toolmind_assistant(message: dict) -> dict:
    calls = None
    if "tool_calls" in message:
        calls = [call["function"] if "function" in call else call
                 for call in message["tool_calls"]]
    reasoning = content = None
    if "content" in message:
        content = message["content"]
        if "<think>" in content:
            if content.count("<think>") != 1 and content.count("</think>") != 1:
                raise ValueError("Invalid reasoning content")
            found = _THINK.search(content)
            if found is None:
                raise ValueError("Invalid reasoning content")
            reasoning, content = found.group(1), content.split("</think>")[-1]
    return {"role": "assistant", "reasoning_content": reasoning, "tool_calls": calls,
            "content": content}


def convert_toolmind(rows: list[dict]) -> tuple[list[dict], list]:
    records, problems = [], []
    for i, row in enumerate(rows):
        where = f"toolmind_{i}"
        try:
            record = {key: value for key, value in row.items() if key != "conversations"}
            record["id"] = where
            messages = []
            for message in row["conversations"]:
                if message["role"] == "assistant":
                    messages.append(_toolmind_assistant(message))
                elif message["role"] in ("user", "tool"):
                    messages.append(message)
                else:  # the released script stops here (NotImplementedError)
                    raise ValueError(f"unsupported role {message['role']!r}")
            record["messages"] = messages
            record["tools"] = [_plain_tool(tool) for tool in row["tools"]]
            records.append(record)
        except (KeyError, TypeError, ValueError) as error:
            problems.append((where, f"{type(error).__name__}: {error}"))
    return records, problems


# ---------------------------------------------------------------- Hammer

def convert_hammer(rows: list[dict]) -> tuple[list[dict], list]:
    records, problems = [], []
    for row in rows:
        where = row.get("trace_id", f"hammer_{len(records)}")
        try:
            tools = [{"name": spec["name"], "parameters": spec.get("parameters", {}),
                      "description": spec.get("description", "")}
                     for spec in row.get("functions", [])]
            messages = [{"role": message["role"], "content": message.get("content")}
                        for message in row.get("messages", [])]
            messages.append({"role": "assistant", "content": row.get("expected_output", ""),
                             "tool_calls": None})
            records.append({"id": where, "messages": messages, "tools": tools})
        except (KeyError, TypeError) as error:
            problems.append((str(where), f"{type(error).__name__}: {error}"))
    return records, problems


CONVERTERS = {"xlam": convert_xlam, "toolace": convert_toolace, "toolmind": convert_toolmind,
              "hammer": convert_hammer}


def convert(source: str, rows: list[dict]) -> tuple[list[dict], list]:
    """Convert ``rows`` of ``source`` (one of ``CONVERTERS``)."""
    if source not in CONVERTERS:
        raise ValueError(f"source must be one of {sorted(CONVERTERS)}, got {source!r}")
    return CONVERTERS[source](rows)
