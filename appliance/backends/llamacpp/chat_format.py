"""Turn chat messages into a prompt with the GGUF's own chat template (or a plain fallback).

Message content is the client's text, never markup. A user message holding `<|im_start|>system\\n...` must
reach the model as those characters, not as a forged system turn, so the formatter says which parts of the
rendered prompt are the template's own markup and which are message content (`Formatted.parts`); the worker
tokenizes only the markup with special-token parsing (see `worker.ChatTokenizer`).

How the parts are found: the template is rendered twice, once with the real messages (`Formatted.prompt`,
exactly the text the template produces) and once with each message's content replaced by a sentinel, a
random string that no client can predict (a fresh 96-bit nonce per render, plus the message's index; the
content's leading and trailing whitespace is kept around it, so templates that `trim` content still insert
it verbatim). The sentinel render is cut at the sentinels; the pieces between them are markup, and each
sentinel stands for its message's content. The split is used only if putting the real contents back in
the sentinels' places gives back the real render character for character: a template that transforms
content (lowercases it, cuts a `<think>` block out of it, branches on what it contains, JSON-escapes it)
fails that check, and then `parts` is None. The worker then tokenizes the real render with special-token
parsing only if no message content contains a control token's text, and otherwise rejects the request
(400): with such a template there is no way to tell which `<|...|>` came from the client.

Templates that insert content verbatim (SmolLM2's ChatML, Gemma's turns, Llama 3, Phi-3, Mistral ...)
take the split path, and for content without control-token text it yields exactly the tokens the old
whole-prompt tokenization gave (tested), so prompt caching and outputs are unchanged.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any

# For base models without a template: a plain transcript the model can continue.
_FALLBACK_STOPS = ["\nUser:", "\nuser:"]

_WS = " \t\n\r\v\f"


@dataclass
class Formatted:
    prompt: str  # the rendered prompt, exactly as the template produced it
    stops: list[str]
    # The prompt cut into (text, is_markup) pieces, in order, joining back to `prompt`: is_markup pieces are
    # the template's own text (special tokens allowed), the others are message content (never special).
    # None when the template transforms content, so that markup and content cannot be told apart.
    parts: list[tuple[str, bool]] | None = None
    contents: list[str] = field(default_factory=list)  # the messages' contents


class ChatFormatter:
    def __init__(self, template: str | None, bos: str, eos: str):
        self.template = template
        self._jinja: Any = None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._jinja = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    @property
    def has_template(self) -> bool:
        return self._jinja is not None

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> str:
        """The template's prompt for `messages` (and `tools`, for templates that render them)."""
        return self._jinja(messages=messages, tools=tools).prompt

    def __call__(self, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> Formatted:
        """`tools` (OpenAI's shape) reach templates that render them; messages may carry `tool_calls`,
        `tool_call_id` and `name` (tool_calls.template_messages). Those and the tools are rendered as markup:
        the caller must check them for control-token text (`tool_calls.markup_texts`)."""
        if self._jinja is not None:
            msgs = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
            r = self._jinja(messages=msgs, tools=tools)
            stops = [s for s in (r.stop if isinstance(r.stop, list) else [r.stop] if r.stop else [])]
            return Formatted(r.prompt, stops, self._split(msgs, r.prompt, tools), [m["content"] for m in msgs])
        parts: list[tuple[str, bool]] = []
        for i, m in enumerate(messages):
            role = {"system": "System", "developer": "System", "assistant": "Assistant", "tool": "Tool"}.get(
                m["role"], "User"
            )
            parts += [(("\n" if i else "") + f"{role}: ", True), (m["content"], False)]
        parts.append(("\nAssistant:" if messages else "Assistant:", True))
        parts = [p for p in parts if p[0]]
        contents = [m["content"] for m in messages]
        return Formatted("".join(t for t, _ in parts), list(_FALLBACK_STOPS), parts, contents)

    def _split(
        self, msgs: list[dict[str, Any]], prompt: str, tools: list[dict] | None = None
    ) -> list[tuple[str, bool]] | None:
        """Markup and content pieces of `prompt`, found by rendering with sentinels; None if not verbatim."""
        nonce = secrets.token_hex(12)
        cores: list[str] = []
        sentinel_msgs = []
        for i, m in enumerate(msgs):
            content = m["content"]
            core = content.strip(_WS)
            lead = content[: len(content) - len(content.lstrip(_WS))]
            trail = content[len(content.rstrip(_WS)) :] if core else ""
            cores.append(core)
            # Empty content stays empty (templates branch on it, e.g. an assistant turn that only calls tools).
            sentinel_msgs.append({**m, "content": f"{lead}sntl{nonce}m{i}e{trail}" if content else ""})
        try:
            rendered = self._jinja(messages=sentinel_msgs, tools=tools).prompt
        except Exception:
            return None
        parts: list[tuple[str, bool]] = []
        pos = 0
        for match in re.finditer(rf"sntl{nonce}m(\d+)e", rendered):
            i = int(match.group(1))
            if i >= len(cores):
                return None
            parts += [(rendered[pos : match.start()], True), (cores[i], False)]
            pos = match.end()
        parts.append((rendered[pos:], True))
        parts = [p for p in parts if p[0]]
        if "".join(t for t, _ in parts) != prompt:
            return None  # the template changed content on its way in: markup and content are not separable
        return parts
