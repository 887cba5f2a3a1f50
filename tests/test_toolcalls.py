"""web/toolcalls.py: tools and tool turns validated (each error naming its param), rendered through
the embedded SmolLM2 template (which ignores tools: our Hermes prompt) and a template that takes
them, <tool_call> blocks parsed whole and streamed at every split, and the forced-call schemas."""

from __future__ import annotations

import json
import random
import re

import pytest
from transformers import AutoTokenizer

from web.intake import FieldError
from web.toolcalls import (
    ToolChoice,
    ToolStream,
    call_prefix,
    call_schema,
    native_tools,
    normalize_messages,
    parse_tool_calls,
    render,
    validate_tools,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")


def fn(name, **extra):
    return {"type": "function", "function": {"name": name, **extra}}


@pytest.mark.parametrize("tools, choice, param", [
    ({"a": 1}, None, "tools"),
    (["get_weather"], None, "tools[0]"),
    ([{"type": "code", "function": {"name": "f"}}], None, "tools[0].type"),
    ([{"type": "function"}], None, "tools[0].function"),
    ([fn("f"), {"type": "function", "function": {"name": "f"}, "extra": 1}], None, "tools[1].extra"),
    ([fn("has space")], None, "tools[0].function.name"),
    ([fn("x" * 65)], None, "tools[0].function.name"),
    ([fn("f\n")], None, "tools[0].function.name"),
    ([fn("f"), fn("f")], None, "tools[1].function.name"),
    ([fn("f", description=3)], None, "tools[0].function.description"),
    ([fn("f", parameters="{}")], None, "tools[0].function.parameters"),
    ([fn("f", parameters={"type": "string"})], None, "tools[0].function.parameters"),
    ([fn("f", strict="yes")], None, "tools[0].function.strict"),
    ([fn("f", examples=[])], None, "tools[0].function.examples"),
    (TOOLS, "always", "tool_choice"),
    (TOOLS, {"type": "function"}, "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "get_date"}}, "tool_choice.function.name"),
    (None, "required", "tool_choice"),
    ([], {"type": "function", "function": {"name": "get_time"}}, "tool_choice.function.name"),
])
def test_validation_errors_name_the_param(tools, choice, param):
    with pytest.raises(FieldError) as err:
        validate_tools(tools, choice)
    assert err.value.param == param and err.value.code == "invalid_request", (err.value.param, err.value.message)


def test_validation_defaults_and_choices():
    assert validate_tools(TOOLS, None) == (TOOLS, ToolChoice("auto"))
    assert validate_tools(None, None) == ([], ToolChoice("none"))
    assert validate_tools([], "auto") == ([], ToolChoice("none"))
    assert validate_tools(TOOLS, "none")[1] == ToolChoice("none")
    assert validate_tools(TOOLS, "required")[1] == ToolChoice("required")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert validate_tools(TOOLS, named)[1] == ToolChoice("function", "get_time")
    strict = fn("f-1_", strict=True, parameters={"properties": {}})
    assert validate_tools([strict], None)[0] == [strict]


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris "}, {"type": "text", "text": "and time?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, cloudy"},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
]


def test_normalize_messages_parses_arguments_and_names_results():
    out = normalize_messages(HISTORY)
    assert out[1] == {"role": "user", "content": "Weather in Paris and time?"}
    assert out[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]}
    assert out[3] == {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C, cloudy"}
    assert out[4]["name"] == "get_time"


def _with(i, **changes):
    msgs = [dict(m) for m in HISTORY]
    msgs[i] |= changes
    return msgs


def _call_with(**changes):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    return _with(2, tool_calls=[call | changes])[:4]


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    (_with(0, role="developer"), "messages[0].role"),
    (_with(1, content=None), "messages[1].content"),
    (_with(1, content=[{"type": "image_url", "image_url": {}}]), "messages[1].content"),
    (_with(2, tool_calls="get_weather"), "messages[2].tool_calls"),
    (_call_with(id=None), "messages[2].tool_calls[0].id"),
    (_call_with(function={"arguments": "{}"}), "messages[2].tool_calls[0].function.name"),
    (_call_with(function={"name": "get_weather", "arguments": "{city: Paris}"}),
     "messages[2].tool_calls[0].function.arguments"),
    (_call_with(function={"name": "get_weather", "arguments": {"city": "Paris"}}),
     "messages[2].tool_calls[0].function.arguments"),
    (_call_with(function={"name": "get_weather", "arguments": "[1]"}),
     "messages[2].tool_calls[0].function.arguments"),
    (_with(3, tool_call_id=None), "messages[3].tool_call_id"),
    (_with(3, tool_call_id="call_9"), "messages[3].tool_call_id"),
    (_with(3, content=None), "messages[3].content"),
])
def test_message_errors_name_the_param(messages, param):
    with pytest.raises(FieldError) as err:
        normalize_messages(messages)
    assert err.value.param == param, (err.value.param, err.value.message)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


def test_embedded_template_ignores_tools_so_render_writes_the_hermes_prompt(smollm2):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    assert smollm2.apply_chat_template(msgs, tools=TOOLS, tokenize=False) == smollm2.apply_chat_template(msgs, tokenize=False)
    assert not native_tools(smollm2)
    text = smollm2.decode(render(smollm2, msgs, TOOLS))
    assert text.startswith("<|im_start|>system\n# Tools\n")  # ours, in place of SmolLM's default
    assert "SmolLM" not in text
    assert "<tools>\n" + json.dumps(WEATHER) + "\n" + json.dumps(TIME) + "\n</tools>" in text
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in text
    assert text.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    plain = smollm2.decode(render(smollm2, msgs, []))
    assert plain == smollm2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_embedded_render_of_tool_turns(smollm2):
    text = smollm2.decode(render(smollm2, normalize_messages(HISTORY), TOOLS))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")  # merged into the system turn
    assert ("<|im_start|>assistant\n<tool_call>\n" + '{"name": "get_weather", "arguments": {"city": "Paris"}}'
            "\n</tool_call>\n<tool_call>\n" + '{"name": "get_time", "arguments": {}}' + "\n</tool_call><|im_end|>") in text
    assert ("<|im_start|>user\n<tool_response>\n18 C, cloudy\n</tool_response>\n"
            "<tool_response>\n14:05\n</tool_response><|im_end|>\n<|im_start|>assistant\n") in text


# A template of our own that takes tools (as Qwen2.5's does), over SmolLM2's ChatML tokens.
NATIVE = (
    "{% if tools %}<|im_start|>system\nFUNCTIONS:{% for t in tools %} {{ t.function.name }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_native_template_gets_tools_and_argument_dicts(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    tok.chat_template = NATIVE
    assert native_tools(tok)
    text = tok.decode(render(tok, normalize_messages(HISTORY), TOOLS))
    assert text.startswith("<|im_start|>system\nFUNCTIONS: get_weather get_time<|im_end|>\n")
    assert "# Tools" not in text and "<tool_call>" not in text
    assert 'CALL get_weather {"city": "Paris"}CALL get_time {}' in text  # dicts, not JSON strings re-encoded
    assert "<|im_start|>tool\n18 C, cloudy<|im_end|>" in text


CALL_W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
CALL_T = '{"name": "get_time", "arguments": {}}'
TWO_CALLS = f"Let me look.\n<tool_call>\n{CALL_W}\n</tool_call>\n<tool_call>\n{CALL_T}\n</tool_call>\n"


def _named(calls):
    for c in calls:
        assert CALL_ID.fullmatch(c["id"]) and c["type"] == "function", c
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_parse_content_and_two_calls():
    content, calls = parse_tool_calls(TWO_CALLS)
    assert content == "Let me look.\n\n\n"
    assert _named(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert calls[0]["id"] != calls[1]["id"]
    assert parse_tool_calls(f"\n<tool_call>\n{CALL_W}\n</tool_call>\n")[0] is None
    assert parse_tool_calls('<tool_call>{"name": "f"}</tool_call>')[1][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("block", [
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": "x=1"}\n</tool_call>',  # arguments not an object
    '<tool_call><tool_call>{"name": "f"}</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {}}',  # never closed
])
def test_malformed_block_stays_content(block):
    content, calls = parse_tool_calls(f"Hi {block} there <tool_call>{CALL_T}</tool_call>")
    if block.endswith("</tool_call>"):
        assert content == f"Hi {block} there " and _named(calls) == [("get_time", {})]
    else:  # the unclosed block runs to the end and swallows the later one
        assert content == f"Hi {block} there <tool_call>{CALL_T}</tool_call>" and calls == []


STREAMED = [
    TWO_CALLS,
    f"\n\n<tool_call>\n{CALL_W}\n</tool_call>\n",
    f"a < b <tool b <tool_cal c <tool_call>oops</tool_call> d <tool_call>{CALL_T}</tool_call> <tool_ca",
    '<tool_call><tool_call>{"name": "f"}</tool_call></tool_call>',
    'Grüße 😀 <tool_call>{"name": "q", "arguments": {"s": "日本</tool_"}}</tool_call>ok',
    'text <tool_call>\n{"name": "x", "arguments": {',
    "  \n ",
    "",
]


def _stream(chunks):
    """Content (None if none) and calls from ToolStream deltas, checking each delta's shape."""
    s, content, calls = ToolStream(), [], []
    for d in [d for c in chunks for d in s.feed(c)] + s.finish():
        if "content" in d:
            assert set(d) == {"content"} and d["content"], d
            content.append(d["content"])
            continue
        (tc,) = d["tool_calls"]
        if tc["index"] == len(calls):  # a call's first delta
            assert set(tc) == {"index", "id", "type", "function"} and tc["function"]["arguments"] == "", tc
            calls.append({"id": tc["id"], "type": tc["type"], "function": dict(tc["function"])})
        else:
            assert tc["index"] == len(calls) - 1 and set(tc) == {"index", "function"}, tc
            assert set(tc["function"]) == {"arguments"}, tc
            calls[-1]["function"]["arguments"] += tc["function"]["arguments"]
    assert s.calls == calls
    return "".join(content) or None, calls


@pytest.mark.parametrize("text", STREAMED)
def test_stream_equals_parse_at_every_split(text):
    content, calls = parse_tool_calls(text)
    expected = (content, _named(calls))
    got = _stream(list(text))
    assert (got[0], _named(got[1])) == expected
    for i in range(len(text) + 1):
        got = _stream([text[:i], text[i:]])
        assert (got[0], _named(got[1])) == expected, i
    rng = random.Random(len(text))
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        got = _stream(chunks)
        assert (got[0], _named(got[1])) == expected, chunks


def test_stream_holds_back_only_a_possible_tag():
    s = ToolStream()
    assert s.feed("\n") == []  # whitespace before any content: held
    assert s.feed("Hello wor") == [{"content": "\nHello wor"}]
    assert s.feed("ld <tool") == [{"content": "ld "}]
    assert s.feed("box>") == [{"content": "<toolbox>"}]
    assert s.feed("<tool_call>") == []
    out = s.feed(CALL_W + "</tool_call>")
    assert out[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert json.loads(out[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert s.feed(" <") == [{"content": " "}]
    assert s.finish() == [{"content": "<"}]


def test_call_schema():
    tools, _ = validate_tools(TOOLS, None)
    assert call_schema(tools, ToolChoice("auto")) is None and call_schema(tools, ToolChoice("none")) is None
    weather = {"type": "object",
               "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER["function"]["parameters"]},
               "required": ["name", "arguments"], "additionalProperties": False}
    assert call_schema(tools, ToolChoice("function", "get_weather")) == weather
    time = {"type": "object", "properties": {"name": {"const": "get_time"}, "arguments": {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}
    assert call_schema(tools, ToolChoice("required")) == {"anyOf": [weather, time]}
    assert call_schema(tools[1:], ToolChoice("required")) == time
    untyped = validate_tools([fn("f", parameters={"properties": {"a": {"type": "integer"}}})], None)[0]
    assert call_schema(untyped, ToolChoice("function", "f"))["properties"]["arguments"] == {
        "type": "object", "properties": {"a": {"type": "integer"}}}
    assert call_prefix == "<tool_call>\n"
