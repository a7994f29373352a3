"""Test helpers: a concrete call list that BFCL's checker accepts for a sample, and the
Qwen3-format completion that makes it. They turn BFCL's possible answers into model
outputs, so the evaluator can be checked against ground truth (100% on every answerable
sample) without a model."""

from __future__ import annotations

import json

from star_train.eval.bfcl import Sample


class _NoPassingOutput(Exception):
    """The possible answer cannot be met by any output under the checker's rules."""


def _accepted_values(allowed: list) -> list:
    # "" marks "may be omitted"; every other entry (None included) is an accepted value.
    return [value for value in allowed if value != ""]


def _concrete_dict(allowed_by_key: dict) -> dict:
    # A dict parameter's possible answer maps each key to its allowed values; BFCL's
    # dict checker lets a key whose allowed values include "" be left out.
    concrete = {}
    for key, allowed in allowed_by_key.items():
        if "" in allowed:
            continue
        if not allowed:
            raise _NoPassingOutput(f"dict key {key!r} accepts no value")
        concrete[key] = allowed[0]
    return concrete


def _concrete_value(value, spec: dict):
    if spec.get("type") == "dict" and isinstance(value, dict):
        return _concrete_dict(value)
    if (spec.get("type") == "array" and spec.get("items", {}).get("type") == "dict"
            and isinstance(value, list) and all(isinstance(item, dict) for item in value)):
        return [_concrete_dict(item) for item in value]
    return value


def _concrete_call(doc: dict, name: str, allowed_by_param: dict) -> dict:
    properties = doc["parameters"].get("properties", {})
    required = doc["parameters"].get("required", [])
    missing = [param for param in required if param not in allowed_by_param]
    if missing:
        # Omitting them fails "required", giving them fails "unexpected parameter".
        raise _NoPassingOutput(f"{name}: required {missing} absent from the possible answer")
    arguments = {}
    for param, allowed in allowed_by_param.items():
        if "" in allowed and param not in required:
            continue  # optional: leave it out
        if param not in properties:
            raise _NoPassingOutput(f"{name}: answer parameter {param!r} is not in the doc")
        if not allowed:
            raise _NoPassingOutput(f"{name}: parameter {param!r} accepts no value")
        accepted = _accepted_values(allowed)
        # A required parameter whose only allowed value is "" takes the empty string.
        arguments[param] = _concrete_value(accepted[0], properties[param]) if accepted else ""
    return {"name": name, "arguments": arguments}


def first_possible_answer(sample: Sample) -> list | None:
    """One concrete call list that BFCL accepts for ``sample``, None if no call list can pass.

    Each call is the first possible answer made concrete: the first allowed value of each
    parameter (nested dicts alike), optional parameters (allowed values include "" and
    the doc does not require them) left out. A few BFCL v3 answers cannot be met by any
    output under the checker's rules: a parameter with no allowed value, an answer
    parameter the doc does not declare and that may not be omitted, a required parameter
    the answer lacks, or (multiple/parallel categories) an answer function missing from
    the docs; for those this returns None. In the simple categories the checker takes
    the function name from the single doc, not from the answer (they differ in
    simple_363), so the doc's name is used. (Ir)relevance samples have no possible
    answer: ValueError.
    """
    if sample.possible_answer is None:
        raise ValueError(f"{sample.id}: {sample.category} has no possible answer")
    docs = {doc["name"]: doc for doc in sample.functions}
    several = "parallel" in sample.category or "multiple" in sample.category
    calls = []
    try:
        for answer in sample.possible_answer:
            (name, allowed_by_param), = answer.items()
            if not several:
                name = sample.functions[0]["name"]
            if name not in docs:
                raise _NoPassingOutput(f"answer function {name!r} is not among the docs")
            calls.append(_concrete_call(docs[name], name, allowed_by_param))
    except _NoPassingOutput:
        return None
    return calls


def completion_for_calls(calls: list, reasoning: str = "") -> str:
    """A completion in the Qwen3 format (after ``<think>\\n``) making ``calls``."""
    blocks = "\n".join(
        "<tool_call>\n" + json.dumps({"name": call["name"], "arguments": call["arguments"]},
                                     ensure_ascii=False) + "\n</tool_call>"
        for call in calls)
    return f"{reasoning}\n</think>\n\n{blocks}<|im_end|>"


# ---------------------------------------------------------------- Java / JavaScript source text

def _java_source(value, doc_type: str, item_type: str | None = None) -> str:
    """``value`` written as the Java source text that BFCL's java_type_converter reads back."""
    if isinstance(value, str):
        return value  # some answers already hold source text, e.g. "new HashMap<>() {...}"
    if doc_type == "boolean":
        return "true" if value else "false"
    if doc_type == "float":
        return f"{value}f"
    if doc_type == "long":
        return f"{value}L"
    if doc_type in ("byte", "short", "integer", "double"):
        return str(value)
    if doc_type == "Array":  # elements converted by their own type, no quotes
        return f"new {item_type}[]{{{', '.join(_java_source(v, item_type) for v in value)}}}"
    if doc_type == "ArrayList":  # String elements are quoted, the converter strips the quotes
        def element(v):
            return f'"{v}"' if item_type == "String" else _java_source(v, item_type)
        return f"new ArrayList<>(Arrays.asList({', '.join(element(v) for v in value)}))"
    if doc_type == "HashMap":
        # A dict answer maps each key to its allowed values, as for Python dicts.
        if all(isinstance(v, list) for v in value.values()):
            value = _concrete_dict(value)
        puts = " ".join(f'put("{k}", {json.dumps(v)});' for k, v in value.items())
        return f"new HashMap<String, String>() {{{{ {puts} }}}}"
    return str(value)  # String, char, any: the text itself


def _js_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_js_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_js_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _js_source(value, doc_type: str) -> str:
    """``value`` written as the JavaScript source text that BFCL's js_type_converter reads."""
    if isinstance(value, str):
        return value
    if doc_type == "Bigint":
        return f"{value}n"
    if doc_type in ("array", "dict", "Boolean", "integer", "float"):
        return _js_value(value)
    return str(value)  # String, any: the text itself


def source_text_calls(sample: Sample) -> list | None:
    """``first_possible_answer`` with every value as Java/JavaScript source text."""
    calls = first_possible_answer(sample)
    if calls is None:
        return None
    docs = {doc["name"]: doc for doc in sample.functions}
    for call in calls:
        properties = docs[call["name"]]["parameters"]["properties"]
        for param, value in call["arguments"].items():
            spec = properties[param]
            if sample.category == "java":
                item_type = spec.get("items", {}).get("type")
                call["arguments"][param] = _java_source(value, spec["type"], item_type)
            else:
                call["arguments"][param] = _js_source(value, spec["type"])
    return calls
