"""Helpers over tool specs as they appear in STAR / xLAM records.

A tool spec is ``{"name", "description", "parameters"}``; the OpenAI-style wrapping
``{"type": "function", "function": {...}}`` is accepted too. ``parameters`` comes in
two shapes in public data:

* JSON-schema: ``{"type": "object" | "dict", "properties": {name: spec}, "required": [...]}``
* flat: ``{name: spec}``, one parameter spec per key.

Shape rule (a flat dict may legitimately have parameters called "type" or
"properties", so key names alone cannot decide):

1. A string under ``"type"`` means JSON-schema. In the flat shape every value is a
   parameter spec (a dict), so a flat parameter named "type" never holds a string.
2. Otherwise, a ``"properties"`` entry that is a dict whose values are all dicts
   (a property map) means JSON-schema without a top-level type. A flat parameter
   named "properties" has a spec as its value, whose values are strings such as its
   type and description, so it is not mistaken for a property map. (An empty
   ``"properties": {}`` counts as an empty property map: no parameters.)
3. Anything else is flat: its keys are the parameter names.

Missing or ``None`` parameters mean the tool takes no arguments.
"""

from __future__ import annotations

from typing import Any


def unwrap_tool(tool: Any) -> dict:
    """The plain ``{"name", "description", "parameters"}`` spec of ``tool``.

    Raises ValueError when it is not a dict or lacks a string name.
    """
    if not isinstance(tool, dict):
        raise ValueError(f"tool must be a dict, got {type(tool).__name__}")
    if "name" not in tool and isinstance(tool.get("function"), dict):
        tool = tool["function"]
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool needs a non-empty string 'name', got {name!r}")
    return tool


def tool_name(tool: Any) -> str:
    return unwrap_tool(tool)["name"]


def _is_property_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(spec, dict) for spec in value.values())


def is_json_schema(parameters: dict) -> bool:
    """True when ``parameters`` is JSON-schema shaped, False when flat (see module doc)."""
    if isinstance(parameters.get("type"), str):
        return True
    return "properties" in parameters and _is_property_map(parameters["properties"])


def tool_parameter_names(tool: Any) -> set[str]:
    """The argument names ``tool`` declares, for either parameter shape."""
    parameters = unwrap_tool(tool).get("parameters")
    if parameters is None:
        return set()
    if not isinstance(parameters, dict):
        raise ValueError(
            f"tool {tool_name(tool)!r}: 'parameters' must be a dict or None, "
            f"got {type(parameters).__name__}")
    if is_json_schema(parameters):
        properties = parameters.get("properties") or {}
        if not isinstance(properties, dict):
            raise ValueError(f"tool {tool_name(tool)!r}: 'properties' must be a dict")
        return set(properties)
    return set(parameters)


def tools_by_name(tools: Any) -> dict[str, list[dict]]:
    """Map each tool name to the (unwrapped) specs with that name, in list order.

    A list per name because public data repeats a name with different schemas
    (4 of the 1024 example rows list two different "search" tools); a call is
    valid when it fits any one of them (see ``call_is_declared``). Every spec's
    parameters are checked here, so a bad spec fails early with its position.
    """
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of tool specs, got {type(tools).__name__}")
    index: dict[str, list[dict]] = {}
    for position, tool in enumerate(tools):
        try:
            spec = unwrap_tool(tool)
            tool_parameter_names(spec)
        except ValueError as error:
            raise ValueError(f"tools[{position}]: {error}") from None
        index.setdefault(spec["name"], []).append(spec)
    return index


def call_is_declared(index: dict[str, list[dict]], name: str, argument_names) -> bool:
    """True when a tool called ``name`` exists and declares every one of ``argument_names``."""
    wanted = set(argument_names)
    return any(wanted <= tool_parameter_names(spec) for spec in index.get(name, ()))
