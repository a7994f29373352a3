"""Tool specs (star_train.data.tools): one rule for the two parameter shapes."""

from star_train.data.tools import is_json_schema, tool_parameter_names, unwrap_tool
from test_reward import TOOL_EMPTY, TOOL_F, TOOL_G  # the hand-made tools, one per shape


def test_parameter_names_for_both_shapes_and_wrapping():
    assert tool_parameter_names(TOOL_F) == {"a", "b", "c", "d"}
    assert tool_parameter_names(TOOL_G) == {"x", "y", "z"}
    assert tool_parameter_names({"type": "function", "function": TOOL_G}) == {"x", "y", "z"}
    assert unwrap_tool({"type": "function", "function": TOOL_G}) is TOOL_G
    xlam_dict = {"type": "dict", "properties": {"n": {"type": "str"}}}
    assert tool_parameter_names({"name": "t", "parameters": xlam_dict}) == {"n"}
    assert tool_parameter_names({"name": "t"}) == set()
    assert tool_parameter_names({"name": "t", "parameters": None}) == set()
    assert tool_parameter_names(TOOL_EMPTY) == set()


def test_flat_parameters_named_type_and_properties_are_not_schema():
    flat_with_type = {"type": {"type": "str", "description": "kind"}, "count": {"type": "int"}}
    assert not is_json_schema(flat_with_type)
    assert tool_parameter_names({"name": "t", "parameters": flat_with_type}) == {"type", "count"}
    flat_with_both = {"type": {"type": "str"}, "properties": {"type": "dict", "description": "props"}}
    assert tool_parameter_names({"name": "t", "parameters": flat_with_both}) == {"type", "properties"}
    flat_only_properties = {"properties": {"type": "str", "description": "which"}}
    assert tool_parameter_names({"name": "t", "parameters": flat_only_properties}) == {"properties"}
    # JSON schema with no top-level type: a property map of dicts plus "required".
    untyped_schema = {"properties": {"q": {"type": "string"}}, "required": ["q"]}
    assert tool_parameter_names({"name": "t", "parameters": untyped_schema}) == {"q"}
    # A schema whose own parameter is called "type".
    schema_with_type_param = {"type": "object", "properties": {"type": {"type": "string"}}}
    assert tool_parameter_names({"name": "t", "parameters": schema_with_type_param}) == {"type"}
