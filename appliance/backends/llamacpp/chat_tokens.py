"""Tokenizing a formatted chat so that text in a message is always text (see `ChatTokenizer`), and the
exception for a request refused before it is queued (`Reject`)."""

from __future__ import annotations

import re
from typing import Any

from appliance.backends.llamacpp.chat_format import Formatted
from appliance.engine.types import Error


class Reject(Exception):
    """A request refused before it is queued: a 400 (or other status) with OpenAI's error fields."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.error = Error(status, message, "invalid_request_error", code, param)


# llama.cpp token attributes (llama_token_attr)
_ATTR_UNKNOWN, _ATTR_CONTROL, _ATTR_LSTRIP, _ATTR_RSTRIP = 1 << 0, 1 << 3, 1 << 7, 1 << 8
_C_SPACE = " \t\n\v\f\r"  # what C's isspace() strips around LSTRIP/RSTRIP tokens


class ChatTokenizer:
    """Tokenize a formatted chat: special tokens are parsed in the template's markup, never in content.

    The result is what `llama_tokenize(prompt, add_bos, parse_special=True)` gives for the whole prompt,
    except that control-token text inside message content stays text. llama.cpp tokenizes with special
    parsing by first cutting the text at control tokens (longest first; LSTRIP/RSTRIP tokens eat the
    whitespace beside them) and then tokenizing each plain fragment on its own. This does the same cut on
    the markup pieces only, joins each run of plain markup text and content into one fragment and has
    llama.cpp tokenize it with special parsing off, so token boundaries at markup/content seams are the same
    as before. Tokens of type USER_DEFINED (ordinary added words, e.g. Gemma's runs of newlines) are still
    matched everywhere, as llama.cpp and Hugging Face's tokenizers both do: they are not markup.
    """

    def __init__(self, model: Any):
        import llama_cpp

        self.model = model
        self.bos, self.eos = model.token_bos(), model.token_eos()
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(model.vocab))
        control: list[tuple[str, int, int]] = []
        longest = 1  # bytes of the longest token text: no token stands for more bytes of input than that
        for tid in range(model.n_vocab()):
            raw = llama_cpp.llama_vocab_get_text(model.vocab, tid)
            longest = max(longest, len(raw))
            attr = model.token_get_attr(tid)
            if raw and attr & (_ATTR_CONTROL | _ATTR_UNKNOWN):
                control.append((raw.decode("utf-8", "replace"), tid, attr))
        self.max_token_bytes = longest + 1  # + a space some tokenizers put before a fragment
        control.sort(key=lambda c: len(c[0]), reverse=True)  # llama.cpp's order: longest first
        self.control = control
        self._control_re: re.Pattern[str] | None = None

    def contains_control(self, text: str) -> bool:
        """Whether `text` holds the text of any control token (which special parsing would turn into it)."""
        if self._control_re is None:
            self._control_re = re.compile("|".join(re.escape(t) for t, _, _ in self.control) or r"(?!)")
        return self._control_re.search(text) is not None

    def __call__(self, fmt: Formatted, add_bos: bool) -> list[int]:
        if fmt.parts is None:  # the template transforms content: markup cannot be told from content
            if any(self.contains_control(t) for t in fmt.contents):
                raise Reject(
                    400,
                    "message content contains the text of one of this model's control tokens, which this "
                    "model's chat template cannot keep apart from its own markup",
                    param="messages",
                )
            return self.model.tokenize(fmt.prompt.encode("utf-8"), add_bos, True)
        markup = "".join(t for t, is_markup in fmt.parts if is_markup)
        present = [c for c in self.control if c[0] in markup]
        # Items: ("tok", id, attr) for a control token, ("text", str) for plain text (markup or content).
        items: list[tuple[Any, ...]] = []
        for text, is_markup in fmt.parts:
            items += _cut(text, present) if is_markup else [("text", text)]
        # Join plain runs into fragments; apply LSTRIP/RSTRIP to the neighbouring fragments.
        seq: list[int | str] = []
        for item in items:
            if item[0] == "text":
                if seq and isinstance(seq[-1], str):
                    seq[-1] += item[1]
                else:
                    seq.append(item[1])
            else:
                seq.append(item[1])
        for i, item in enumerate(seq):
            if isinstance(item, int):
                attr = self.model.token_get_attr(item)
                if attr & _ATTR_LSTRIP and i > 0 and isinstance(seq[i - 1], str):
                    seq[i - 1] = seq[i - 1].rstrip(_C_SPACE)  # type: ignore[union-attr]
                if attr & _ATTR_RSTRIP and i + 1 < len(seq) and isinstance(seq[i + 1], str):
                    seq[i + 1] = seq[i + 1].lstrip(_C_SPACE)  # type: ignore[union-attr]
        tokens: list[int] = [self.bos] if add_bos and self.bos >= 0 else []
        for item in seq:
            if isinstance(item, int):
                tokens.append(item)
            elif item:
                tokens += self.model.tokenize(item.encode("utf-8"), False, False)
        if add_bos and self.add_eos and self.eos >= 0:
            tokens.append(self.eos)
        return tokens


def _cut(text: str, control: list[tuple[str, int, int]]) -> list[tuple[Any, ...]]:
    """Cut markup text at control tokens as llama.cpp does: each token in turn, longest first."""
    frags: list[tuple[Any, ...]] = [("text", text)]
    for ctext, tid, attr in control:
        out: list[tuple[Any, ...]] = []
        for frag in frags:
            if frag[0] != "text" or ctext not in frag[1]:
                out.append(frag)
                continue
            pieces = frag[1].split(ctext)
            for j, piece in enumerate(pieces):
                if j:
                    out.append(("tok", tid, attr))
                if piece:
                    out.append(("text", piece))
        frags = out
    return frags
