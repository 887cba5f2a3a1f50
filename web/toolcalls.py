"""OpenAI function calling (`tools`, `tool_choice`) for the chat door: the request's tools and tool
turns validated, rendered into the prompt (the model's own template, or a Hermes-style system
prompt where the template ignores tools), and `<tool_call>` blocks parsed back out of the answer,
whole or streamed. Called by web/openai_api.py only; the grammar that enforces `call_schema` lives
elsewhere."""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from streamer.types import RequestError
from web.intake import FieldError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# What a forced call (tool_choice "required" or a named function) must generate: call_prefix, then
# JSON matching call_schema(), then call_suffix.
call_prefix = OPEN + "\n"
call_suffix = "\n" + CLOSE

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ROLES = ("system", "user", "assistant", "tool")
ID_CHARS = string.ascii_letters + string.digits
MODES = ("auto", "none", "required")

TOOLS_PROMPT = (
    "# Tools\n\n"
    "You may call one or more functions to help with the user's request. The functions you can "
    "call are described as JSON inside <tools></tools> tags:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags, one block per call:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)

Delta = dict  # a chat.completion.chunk's `delta`: {"content": str} or {"tool_calls": [...]}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "auto" | "none" | "required" | "function"
    name: str | None = None  # the function that must be called, for mode "function"


# --- the request: tools, tool_choice and messages ---------------------------------------------


def _check_keys(obj: dict, allowed: set[str], param: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise FieldError(f"{param}.{unknown[0]}", f"unsupported field {param}.{unknown[0]}")


def validate_tools(tools: Any, tool_choice: Any) -> tuple[list[dict], ToolChoice]:
    """The request's tools (as {"type": "function", "function": {...}}, unknown fields refused)
    and its tool choice: "auto" by default when tools are given, "none" when not. FieldError
    names the offending param."""
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise FieldError("tools", "'tools' must be a list")
    out: list[dict] = []
    for i, tool in enumerate(tools):
        p = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise FieldError(p, f"{p} must be an object")
        _check_keys(tool, {"type", "function"}, p)
        if tool.get("type") != "function":
            raise FieldError(f"{p}.type", f"{p}.type must be 'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise FieldError(f"{p}.function", f"{p}.function must be an object")
        p += ".function"
        _check_keys(fn, {"name", "description", "parameters", "strict"}, p)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise FieldError(f"{p}.name", f"{p}.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
        if any(t["function"]["name"] == name for t in out):
            raise FieldError(f"{p}.name", f"{p}.name {name!r} is given twice")
        if "description" in fn and not isinstance(fn["description"], str):
            raise FieldError(f"{p}.description", f"{p}.description must be a string")
        params = fn.get("parameters")
        if "parameters" in fn and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise FieldError(f"{p}.parameters", f"{p}.parameters must be a JSON schema of type 'object'")
        if "strict" in fn and not isinstance(fn["strict"], bool):
            raise FieldError(f"{p}.strict", f"{p}.strict must be a boolean")
        out.append({"type": "function", "function": dict(fn)})
    return out, _choice(tool_choice, [t["function"]["name"] for t in out])


def _choice(choice: Any, names: list[str]) -> ToolChoice:
    if choice is None:
        return ToolChoice("auto" if names else "none")
    if isinstance(choice, str):
        if choice not in MODES:
            raise FieldError("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or a function")
        if choice == "required" and not names:
            raise FieldError("tool_choice", "tool_choice 'required' needs 'tools'")
        return ToolChoice(choice if names else "none")
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(choice.get("function"), dict):
        raise FieldError("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or "
                         '{"type": "function", "function": {"name": ...}}')
    name = choice["function"].get("name")
    if name not in names:
        raise FieldError("tool_choice.function.name", f"tool_choice names {name!r}, which is not one of 'tools'")
    return ToolChoice("function", name)


def _text(content: Any, param: str) -> str:
    """Message content: a string, or a list of text parts (joined)."""
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise FieldError(param, f"{param} must be a string or a list of text parts")
    return content


def normalize_messages(messages: Any) -> list[dict]:
    """Chat messages as HF chat templates take them: content a string ("" for an assistant turn
    that only calls tools), tool_calls' arguments parsed to dicts, each tool result with the
    `name` of the function it answers. FieldError names the offending param."""
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "'messages' must be a non-empty list")
    out: list[dict] = []
    called: dict[str, str] = {}  # tool_call id -> function name, of the calls made so far
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise FieldError(p, f"{p} must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise FieldError(f"{p}.role", f"{p}.role must be one of: {', '.join(ROLES)}")
        calls = (m.get("tool_calls") or None) if role == "assistant" else None  # [] is no calls
        if calls is not None and m.get("content") is None:
            content = ""
        else:
            content = _text(m.get("content"), f"{p}.content")
        msg: dict = {"role": role, "content": content}
        if calls is not None:
            if not isinstance(calls, list):
                raise FieldError(f"{p}.tool_calls", f"{p}.tool_calls must be a list")
            msg["tool_calls"] = [_call_turn(c, f"{p}.tool_calls[{j}]") for j, c in enumerate(calls)]
            called.update((c["id"], c["function"]["name"]) for c in msg["tool_calls"])
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in called:
                raise FieldError(f"{p}.tool_call_id", f"{p}.tool_call_id must be the id of an earlier tool call")
            msg |= {"tool_call_id": call_id, "name": called[call_id]}
        out.append(msg)
    return out


def _call_turn(call: Any, p: str) -> dict:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise FieldError(p, f"{p} must be a function call")
    fn = call.get("function")
    if not isinstance(call.get("id"), str) or not call["id"]:
        raise FieldError(f"{p}.id", f"{p}.id must be a non-empty string")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise FieldError(f"{p}.function.name", f"{p}.function.name must be a string")
    try:
        args = json.loads(fn.get("arguments"))
    except (TypeError, ValueError, RecursionError):
        args = None
    if not isinstance(args, dict):
        raise FieldError(f"{p}.function.arguments", f"{p}.function.arguments must be a JSON object, as a string")
    return {"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}}


# --- the prompt ----------------------------------------------------------------------------------

_native: dict[str, bool] = {}  # chat template source -> whether it renders `tools`


def native_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template shows the model its tools (rendered once per template
    with a probe tool, whose name must appear)."""
    key = str(tokenizer.chat_template)
    if key not in _native:
        probe = {"type": "function", "function": {"name": "probe_fn_q7z", "parameters": {"type": "object"}}}
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=[probe],
                                                 add_generation_prompt=True, tokenize=False)
        except Exception:  # a template that chokes on tools does not take them
            text = ""
        _native[key] = "probe_fn_q7z" in text
    return _native[key]


def render(tokenizer, messages: list[dict], tools: list[dict]) -> list[int]:
    """Prompt ids for normalized `messages` and validated `tools` (pass [] to show none, as for
    tool_choice "none"). A template that ignores tools gets plain messages: tool turns written as
    Hermes text and the tools in the system prompt."""
    native = native_tools(tokenizer)
    if not native:
        messages = hermes_messages(messages, tools)
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools if native and tools else None,
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:  # as streamer/prompt.py's encode_chat
        raise RequestError("invalid_request", f"chat template failed: {exc}") from None
    return list(ids)


def hermes_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Plain {role, content} messages: calls as <tool_call> blocks in the assistant's text, results
    as <tool_response> blocks in a user turn (consecutive results in one), the tools in the first
    system message (or a new one)."""
    out: list[dict] = []
    for n, m in enumerate(messages):
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if n and messages[n - 1]["role"] == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            continue
        content = m["content"]
        for c in m.get("tool_calls", ()):
            call = json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                              ensure_ascii=False)
            content += ("\n" if content else "") + call_prefix + call + call_suffix
        out.append({"role": m["role"], "content": content})
    if tools:
        prompt = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# --- the answer ----------------------------------------------------------------------------------


def _call(body: str) -> dict | None:
    """The OpenAI tool call a <tool_call> block's body holds, or None if it holds none."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("arguments", {}), dict):
        return None
    call_id = "call_" + "".join(secrets.choice(ID_CHARS) for _ in range(24))
    args = json.dumps(obj.get("arguments", {}), ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": obj["name"], "arguments": args}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Split a whole answer into its content (None if only whitespace) and its tool calls. A block
    that is unclosed, not JSON or without a "name" stays in the content as written."""
    content, calls, i = [], [], 0
    while (j := text.find(OPEN, i)) >= 0 and (k := text.find(CLOSE, j + len(OPEN))) >= 0:
        call = _call(text[j + len(OPEN):k])
        end = k + len(CLOSE)
        content.append(text[i:j] if call else text[i:end])
        calls += [call] if call else []
        i = end
    content.append(text[i:])
    joined = "".join(content)
    return (joined if joined.strip() else None), calls


def _held(text: str) -> int:
    """How many of `text`'s last characters could begin an OPEN tag still to come."""
    for n in range(min(len(text), len(OPEN) - 1), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


class ToolStream:
    """`parse_tool_calls` over a stream of text deltas: content goes out at once, except text that
    could still begin a <tool_call> tag and whitespace before any other content; a call goes out
    when its block closes, as OpenAI streams one (id, type and name with arguments "", then the
    arguments). The concatenated content and the calls equal parse_tool_calls of the whole text."""

    def __init__(self) -> None:
        self.calls: list[dict] = []  # the calls so far (finish_reason "tool_calls" if any)
        self._buf = ""  # text not yet sent: after the last tag outside a block, the body inside one
        self._inside = False
        self._blank = ""  # whitespace-only content held until other content comes
        self._started = False

    def feed(self, delta: str) -> list[Delta]:
        self._buf += delta
        out: list[Delta] = []
        while True:
            if self._inside:
                k = self._buf.find(CLOSE)
                if k < 0:
                    return out
                body, self._buf, self._inside = self._buf[:k], self._buf[k + len(CLOSE):], False
                call = _call(body)
                if call is None:
                    self._content(OPEN + body + CLOSE, out)
                else:
                    out += self._call_deltas(call)
            else:
                j = self._buf.find(OPEN)
                if j < 0:
                    n = len(self._buf) - _held(self._buf)
                    self._content(self._buf[:n], out)
                    self._buf = self._buf[n:]
                    return out
                self._content(self._buf[:j], out)
                self._buf, self._inside = self._buf[j + len(OPEN):], True

    def finish(self) -> list[Delta]:
        """The text still held (an unclosed block is content); then nothing more comes."""
        out: list[Delta] = []
        self._content((OPEN if self._inside else "") + self._buf, out)
        self._buf, self._inside = "", False
        return out

    def _content(self, text: str, out: list[Delta]) -> None:
        if not self._started:
            self._blank += text
            if not self._blank or self._blank.isspace():
                return
            text, self._blank, self._started = self._blank, "", True
        if text:
            out.append({"content": text})

    def _call_deltas(self, call: dict) -> list[Delta]:
        index = len(self.calls)
        self.calls.append(call)
        fn = call["function"]
        return [{"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                 "function": {"name": fn["name"], "arguments": ""}}]},
                {"tool_calls": [{"index": index, "function": {"arguments": fn["arguments"]}}]}]


# --- forced calls ------------------------------------------------------------------------------


def call_schema(tools: list[dict], choice: ToolChoice) -> dict | None:
    """The JSON schema of the object a forced call writes between call_prefix and call_suffix:
    one function's for a named choice, any function's for "required"; None for auto and none."""
    if choice.mode == "function":
        fns = [t["function"] for t in tools if t["function"]["name"] == choice.name]
    elif choice.mode == "required":
        fns = [t["function"] for t in tools]
    else:
        return None
    assert fns, (choice, tools)  # validate_tools checked the name
    schemas = [{"type": "object",
                "properties": {"name": {"const": fn["name"]},
                               "arguments": {"type": "object", **fn.get("parameters", {})}},
                "required": ["name", "arguments"], "additionalProperties": False} for fn in fns]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def call_grammar(schema: dict) -> tuple[str, str]:
    """The grammar (SamplingParams.grammar: a Lark grammar for streamer/grammar.py) of a forced
    call: call_prefix, a JSON object matching `schema` (compact), call_suffix."""
    compact = {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}}
    return ("lark", f"start: {json.dumps(call_prefix)} call {json.dumps(call_suffix)}\ncall: %json {json.dumps(compact)}\n")
