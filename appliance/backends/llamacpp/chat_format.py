"""Turn chat messages into a prompt with the GGUF's own chat template (or a plain fallback)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# For base models without a template: a plain transcript the model can continue.
_FALLBACK_STOPS = ["\nUser:", "\nuser:"]


@dataclass
class Formatted:
    prompt: str
    stops: list[str]


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

    def __call__(self, messages: list[dict[str, str]]) -> Formatted:
        if self._jinja is not None:
            msgs = [
                {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages
            ]
            r = self._jinja(messages=msgs)
            stops = [s for s in (r.stop if isinstance(r.stop, list) else [r.stop] if r.stop else [])]
            return Formatted(r.prompt, stops)
        lines = []
        for m in messages:
            role = {"system": "System", "developer": "System", "assistant": "Assistant", "tool": "Tool"}.get(
                m["role"], "User"
            )
            lines.append(f"{role}: {m['content']}")
        lines.append("Assistant:")
        return Formatted("\n".join(lines), list(_FALLBACK_STOPS))
