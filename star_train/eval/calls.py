"""Parsed calls as the Python call strings that BFCL's executable checkers ``eval``.

BFCL turns a function-calling model's calls into strings with
``bfcl.model_handler.utils.convert_to_function_call`` (``name(k=repr(v),...)``) and then
``eval``s/``exec``s them (multi-turn: ``multi_turn_utils.execute_multi_turn_func_call``;
executable categories: ``executable_checker.executable_checker_simple``). That module
imports third-party packages that ``--no-deps`` does not install, so the conversion is
mirrored here, with one safety change: BFCL pastes the model's function and argument names
into the string as they come, so a name such as ``f(x=__import__('os')...)`` would run
arbitrary code. Here a call whose name or argument names are not plain identifiers becomes
``str('<name>')()``, a call of a string, which evaluates to a TypeError: the same outcome
(an execution error) without running anything the model wrote. Values are
``repr``s of JSON values, which are always literals.
"""

from __future__ import annotations

import keyword


def _is_name(text) -> bool:
    return isinstance(text, str) and text.isidentifier() and not keyword.iskeyword(text)


def to_execution_string(call: dict) -> str:
    """``{"name", "arguments"}`` -> ``'name(k=v,...)'`` as BFCL's convert_to_function_call."""
    name, arguments = call["name"], call["arguments"]
    if not _is_name(name) or not all(_is_name(key) for key in arguments):
        return f"str({str(name)!r})()"
    return f"{name}({','.join(f'{key}={value!r}' for key, value in arguments.items())})"


def to_execution_strings(calls: list) -> list[str]:
    return [to_execution_string(call) for call in calls]
