"""The Qwen3 response parser (star_train.chat.qwen3.parse_response); its malformed cases
are in test_reward.py, where they must also score -1."""

from star_train.chat.qwen3 import parse_response


def text_response(reply: str) -> str:
    return f"<think>\nok\n</think>\n\n{reply}"


def test_parse_tool_calls_with_whitespace_and_end_token():
    text = ('<think>\nweigh options\n</think>\n\n<tool_call>  \n {"name": "f", "arguments": {"a": "x"}}'
            '\n\n</tool_call>\n<tool_call>{"name": "ping", "arguments": {}}</tool_call>\n<|im_end|>\n')
    parsed = parse_response(text)
    assert parsed.error is None
    assert parsed.reasoning == "weigh options"
    assert parsed.tool_calls == [{"name": "f", "arguments": {"a": "x"}},
                                 {"name": "ping", "arguments": {}}]
    assert parsed.reply == ""


def test_parse_text_reply_and_endoftext():
    parsed = parse_response("<think></think>\n\nHello there.<|endoftext|>")
    assert parsed == parse_response("<think></think>Hello there.")
    assert (parsed.reasoning, parsed.tool_calls, parsed.reply, parsed.error) == ("", None, "Hello there.", None)


def test_parse_keeps_content_beside_calls():
    parsed = parse_response(text_response('Calling now.\n<tool_call>{"name": "ping", "arguments": {}}</tool_call>'))
    assert parsed.error is None and parsed.reply == "Calling now."
    assert parsed.tool_calls == [{"name": "ping", "arguments": {}}]
