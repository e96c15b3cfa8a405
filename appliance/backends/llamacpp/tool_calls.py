"""Tool calls on llama.cpp models: which call syntax a model uses, how tools and tool turns reach its chat
template, and an incremental parser that turns generated text into `ToolCallDelta` events.

Formats (`detect_format`; overridable per model with `tool_format` in the models file):

- `native-hermes`: the template renders `tools` and teaches `<tool_call>{"name": .., "arguments": ..}</tool_call>`
  (Qwen 2.5/3, Hermes 2/3, many fine-tunes).
- `native-llama3`: the template renders `tools` and teaches a bare `{"name": .., "parameters": ..}` reply
  (Llama 3.1/3.2/3.3).
- `generic`: every other model (SmolLM2's template ignores `tools`): the tool schemas go into a system
  instruction (as message content, so never parsed for special tokens) and the model writes the Hermes form,
  which the grammar (grammar.py) enforces.

Every function here is pure; the worker renders, the API-side backend parses (`ToolCallParser`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable

from appliance.engine.types import (
    GenerateRequest,
    Message,
    Token,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)

FORMATS = ("generic", "native-hermes", "native-llama3")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_PROBE = "appliance_probe_tool_f3a9"

TemplateRender = Callable[[list[dict], list[dict]], str]  # (messages, tools) -> prompt
Spans = Callable[[int, int], list[TokenLogprob] | None]  # (start, end) of text in the input -> its tokens' logprobs


def detect_format(template: str | None, render: TemplateRender | None) -> str:
    """The call syntax for a chat template: native where the template renders `tools` in a known family's
    form (checked by rendering a probe tool), else `generic`."""
    if not template or "tools" not in template or render is None:
        return "generic"
    try:
        probe = template_tools([Tool(_PROBE, "probe", {"type": "object", "properties": {}})])
        prompt = render([{"role": "user", "content": "hi"}], probe)
    except Exception:
        return "generic"
    if _PROBE not in prompt:
        return "generic"
    if OPEN in template:
        return "native-hermes"
    if '"parameters": dictionary' in template or ("ipython" in template and "parameters" in template):
        return "native-llama3"
    return "generic"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def template_tools(tools: list[Tool]) -> list[dict]:
    """Tools as chat templates expect them (OpenAI's shape)."""
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in tools
    ]


def _arguments(text: str) -> object:
    """A call's arguments as the template wants them: the parsed object (templates `tojson` it)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def call_text(call: ToolCall, key: str = "arguments") -> str:
    """A call in the Hermes form (what generic models are taught to write)."""
    args = call.arguments.strip() or "{}"
    return f'{OPEN}\n{{"name": {json.dumps(call.name)}, "{key}": {args}}}\n{CLOSE}'


def template_messages(messages: list[Message], fmt: str) -> list[dict]:
    """Messages as template dicts. Native formats pass `tool_calls` and tool turns to the template; generic
    writes calls into the assistant's content and results of calls as user turns (any template renders
    those; Gemma's, for one, refuses a `tool` role)."""
    out: list[dict] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if fmt != "generic":
            d: dict = {"role": role, "content": m.content or ""}
            if m.tool_calls:
                d["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                    for c in m.tool_calls
                ]
            if role == "tool":
                d["tool_call_id"] = m.tool_call_id or ""
                if m.name:
                    d["name"] = m.name
            out.append(d)
        elif m.tool_calls:
            calls = "\n".join(call_text(c) for c in m.tool_calls)
            out.append({"role": "assistant", "content": f"{m.content}\n{calls}" if m.content else calls})
        elif role == "tool" and (m.tool_call_id or m.name):  # a call's result (a bare tool turn stays as is)
            result = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].get("tool_result"):  # consecutive results: one user turn
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_result": True})
        else:
            out.append({"role": role, "content": m.content})
    for d in out:
        d.pop("tool_result", None)
    return out


def instruction(tools: list[Tool], choice: ToolChoice) -> str:
    """The system instruction that describes the tools to a generic model."""
    lines = ["You can call these functions:"]
    for t in tools:
        lines.append(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}))
    lines.append(
        f'To call a function, reply with:\n{OPEN}\n{{"name": <function name>, "arguments": <JSON object>}}\n{CLOSE}'
    )
    if choice.mode == "function":
        lines.append(f"Call the function {choice.name} now.")
    elif choice.mode == "required":
        lines.append("Call a function now.")
    else:
        lines.append("Call a function when it helps; otherwise answer normally.")
    return "\n".join(lines)


def with_instruction(msgs: list[dict], text: str) -> list[dict]:
    """Put `text` into the system turn (appended to the first one, or a new one first)."""
    if msgs and msgs[0]["role"] == "system":
        first = msgs[0]["content"]
        return [{**msgs[0], "content": f"{first}\n\n{text}" if first else text}, *msgs[1:]]
    return [{"role": "system", "content": text}, *msgs]


def chat_input(
    messages: list[Message], tools: list[Tool], choice: ToolChoice, fmt: str
) -> tuple[list[dict], list[dict] | None]:
    """What the chat template gets for a request: (messages, tools). Tools reach a native template as
    `tools`; a generic model gets them in a system instruction. `none` (or no tools): no tools shown."""
    msgs = template_messages(messages, fmt)
    if not tools or choice.mode == "none":
        return msgs, None
    if fmt == "generic":
        return with_instruction(msgs, instruction(tools, choice)), None
    return msgs, template_tools(tools)


def markup_texts(msgs: list[dict], tools: list[dict] | None) -> list[tuple[str, str]]:
    """(param, text) of client text that a native template renders outside `content` (tool schemas, call
    names and arguments, call ids): control-token text in it cannot be told from markup, so it is refused."""
    out = [("tools", json.dumps(tools, ensure_ascii=False))] if tools else []
    for m in msgs:
        if m.get("tool_calls"):
            out.append(("messages", json.dumps(m["tool_calls"], ensure_ascii=False)))
        for key in ("tool_call_id", "name"):
            if m.get(key):
                out.append(("messages", str(m[key])))
    return out


def tool_parser(req: GenerateRequest, fmt: str, logprobs: Spans | None = None) -> ToolCallParser | None:
    """The parser for a request's output: None where no call can come (no tools, `none`, a completion)."""
    if req.messages is None or not req.tools or req.tool_choice.mode == "none":
        return None
    return ToolCallParser(fmt, logprobs=logprobs)


# -- parsing generated text -----------------------------------------------------------------------------

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_MAX_HELD = 1 << 20  # characters of one unfinished call held before it is given up as text


def _scan(text: str, state: list[int]) -> int:
    """Feed `text` to a JSON-value scanner; state = [depth, in_string, escaped, started].
    Returns the index just past the end of the value, or -1 if it has not ended yet."""
    depth, in_str, esc, started = state
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = 0
            elif ch == "\\":
                esc = 1
            elif ch == '"':
                in_str = 0
                if depth == 0:
                    state[:] = [0, 0, 0, 1]
                    return i + 1
        elif ch == '"':
            in_str, started = 1, 1
        elif ch in "{[":
            depth, started = depth + 1, 1
        elif ch in "}]":
            depth -= 1
            if depth <= 0:
                state[:] = [0, 0, 0, 1]
                return i + 1
        elif not ch.isspace():
            started = 1
            if depth == 0 and ch in ",":
                state[:] = [0, 0, 0, 1]
                return i
    state[:] = [depth, in_str, esc, started]
    return -1


class ToolCallParser:
    """Generated text in, `Token` and `ToolCallDelta` events out, while streaming.

    Each call gives first `ToolCallDelta(index, id=call_…, name=…, arguments="")`, then argument pieces
    (`ToolCallDelta(index, arguments=…)`) whose concatenation is the call's arguments JSON. Text that may be
    the start of a call is held back until it is known; whitespace around calls is dropped.

    Every piece of text let through is a contiguous span [start, end) of the input (character offsets into
    all text fed); `logprobs(start, end)`, when given, supplies its Token's logprobs (a call's text has none).
    """

    def __init__(self, fmt: str, new_id: Callable[[], str] = new_call_id, logprobs: Spans | None = None):
        self.fmt = "native-llama3" if fmt == "native-llama3" else "hermes"
        self.new_id = new_id
        self.logprobs = logprobs
        self.fed = 0  # characters fed so far: self.buf is always the input's last len(self.buf) characters
        self.calls = 0
        self.buf = ""
        self.state = "text"  # text | head | args | tail | plain (llama3: not a call)
        self.raw = ""  # the current call's text so far (given back as text if it is no call)
        self.scan = [0, 0, 0, 0]
        self.emitted_text = False

    # -- public ------------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Token | ToolCallDelta]:
        self.buf += text
        self.fed += len(text)
        out: list[Token | ToolCallDelta] = []
        while True:
            before = (self.state, len(self.buf))
            getattr(self, "_" + self.state)(out)
            if (self.state, len(self.buf)) == before:
                return out

    def close(self) -> list[Token | ToolCallDelta]:
        """The generation ended: release what is held (an unfinished call that is no call becomes text)."""
        out: list[Token | ToolCallDelta] = []
        if self.state == "head":
            text = self.raw + self.buf
            if not self._whole_call(text, out):
                self._text_out(out, text, self._at() - len(self.raw))
        elif self.state in ("text", "plain") and (self.buf.strip() or not self.calls):
            self._text_out(out, self.buf, self._at())
        self.buf = ""
        return out

    # -- states ------------------------------------------------------------------------------------
    def _at(self) -> int:
        """The input offset of self.buf's first character."""
        return self.fed - len(self.buf)

    def _text_out(self, out: list, text: str, start: int) -> None:
        if text:
            self.emitted_text = True
            out.append(Token(text, self.logprobs(start, start + len(text)) if self.logprobs else None))

    def _text(self, out: list) -> None:
        buf = self.buf
        if self.fmt == "native-llama3":  # a call is the whole reply (or `;`-separated calls)
            stripped = buf.lstrip()
            if self.calls and stripped.startswith(";"):
                self.buf = stripped[1:]
            elif stripped.startswith("{") and not self.emitted_text:
                self.state, self.raw, self.buf = "head", "", stripped
            elif stripped:
                self.state = "plain"
            return
        i = buf.find(OPEN)
        if i >= 0:
            self._text_out(out, buf[:i].rstrip(), self._at())  # whitespace before a call is dropped
            self.state, self.raw, self.buf = "head", OPEN, buf[i + len(OPEN) :]
            return
        hold = next((n for n in range(min(len(OPEN) - 1, len(buf)), 0, -1) if buf.endswith(OPEN[:n])), 0)
        safe, held = buf[: len(buf) - hold], buf[len(buf) - hold :]
        kept = safe.rstrip()  # trailing whitespace waits: a call may follow
        ws = safe[len(kept) :]
        body = kept.lstrip() if self.calls and not self.emitted_text else kept  # and whitespace after a call goes
        self._text_out(out, body, self._at() + len(kept) - len(body))
        self.buf = ws + held if body else buf

    def _plain(self, out: list) -> None:
        self._text_out(out, self.buf, self._at())
        self.buf = ""

    def _head(self, out: list) -> None:
        m = _HEAD.match(self.buf)
        if m is None:
            if self.fmt == "hermes" and CLOSE in self.buf:  # a complete block in another key order, or no call
                block, rest = self.buf.split(CLOSE, 1)
                if not self._whole_call(block, out):
                    self._text_out(out, self.raw + block + CLOSE, self._at() - len(self.raw))
                self.state, self.raw, self.buf = "text", "", rest
            elif len(self.buf) > _MAX_HELD:
                self._text_out(out, self.raw + self.buf, self._at() - len(self.raw))
                self.state, self.raw, self.buf = "plain", "", ""
            return
        try:
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            name = m.group(1)
        out.append(ToolCallDelta(self.calls, "", self.new_id(), name))
        self.calls += 1
        self.state, self.buf, self.scan = "args", self.buf[m.end() :], [0, 0, 0, 0]

    def _args(self, out: list) -> None:
        if not self.scan[3]:
            self.buf = self.buf.lstrip()  # the arguments start at their first character, however chunked
        if not self.buf:
            return
        end = _scan(self.buf, self.scan)
        piece = self.buf if end < 0 else self.buf[:end]
        if piece:
            out.append(ToolCallDelta(self.calls - 1, piece))
        self.buf = "" if end < 0 else self.buf[end:]
        if end >= 0:
            self.state = "tail"

    def _tail(self, out: list) -> None:
        if self.fmt == "native-llama3":
            j = self.buf.find("}")
            if j >= 0:
                self.state, self.buf = "text", self.buf[j + 1 :]
            return
        j = self.buf.find(CLOSE)
        if j >= 0:
            self.state, self.buf = "text", self.buf[j + len(CLOSE) :]

    def _whole_call(self, text: str, out: list) -> bool:
        """A complete call in any key order (`{"arguments": .., "name": ..}`): emit it whole."""
        try:
            obj = json.loads(text.removeprefix(OPEN).strip())
        except ValueError:
            return False
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return False
        args = obj.get("arguments", obj.get("parameters", {}))
        args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        out.append(ToolCallDelta(self.calls, "", self.new_id(), obj["name"]))
        out.append(ToolCallDelta(self.calls, args_text))
        self.calls += 1
        return True
