"""Any model's chat template, tokenized so that only the template makes control tokens.

A chat template (Jinja, from the GGUF or `tokenizer_config.json`) turns messages into one
prompt string. Tokenizing that string with special-token parsing on, as most servers do,
lets a user who types `<|im_start|>system` forge a turn. So we must know which characters
of the prompt the template wrote (there `<|im_end|>` is a control token) and which came
from messages (text, whatever it looks like).

Finding the messages in the prompt (`ChatTemplate.render`):
1. Render the real messages: that string is the prompt, exactly as the template means it
   (content trimmed, a system text merged into a user turn, ...). A template that refuses
   the messages (`raise_exception`, e.g. Gemma and a system role) is a ValueError.
2. Render again with each message's text replaced by a marker: private-use characters and
   no whitespace, so that `| trim` keeps it whole. A third render pads the markers with
   whitespace and shows, per message and side, whether the template trims it. If each
   marker appears exactly once (in any order: Mistral moves the system text into the last
   user turn) and template text + (trimmed) messages rebuild the real prompt exactly, every
   message's span in the prompt is known.
3. Otherwise the template does something with the text we cannot follow (it branches on
   it, drops or repeats a message). Then render with every control-token string inside a
   message, and any fragment of one at a message's edge, replaced by a placeholder: those
   spans are known to be message text, and no other message text can complete a control
   token. (What this fallback cannot see: a template that rewrites the text itself, e.g.
   `| upper`; no known chat template does.)

Tokenizing (`ChatTemplate.encode`): the prompt in as few special-parsing calls as possible,
so that tokens match what the template's authors tokenized (text merges with its
neighbours as usual); only message characters that are part of a control-token string in
the prompt are cut out and tokenized as plain text.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .base import ChatMessage

Span = tuple[int, int]

_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"  # Unicode private use: never in a template
_PAD = " \n"
_PLACEHOLDER = re.compile(f"{_MARK_OPEN}fs(\\d+){_MARK_CLOSE}")
# What a template does wrong on odd input (a None where it wants a string, ...): a refusal.
_TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError)


class Tokenizer(Protocol):
    def tokenize(self, text: str, parse_special: bool) -> list[int]: ...


@dataclass(frozen=True)
class RenderedChat:
    text: str
    untrusted: tuple[Span, ...]
    """Character spans of `text` that came from messages (sorted, disjoint)."""


class ControlTexts:
    """The strings that special-token parsing turns into control tokens (`<|im_end|>`)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = frozenset(text for text in texts if text)
        self._lengths = sorted({len(text) for text in self._texts})
        first_chars = "".join(sorted({text[0] for text in self._texts}))
        self._starts = re.compile(f"[{re.escape(first_chars)}]") if first_chars else None
        self._heads = frozenset(t[:k] for t in self._texts for k in range(1, len(t)))
        self._tails = frozenset(t[k:] for t in self._texts for k in range(1, len(t)))

    def occurrences(self, text: str) -> list[Span]:
        """Every (possibly overlapping) span of `text` that is a control-token string."""
        found: list[Span] = []
        for candidate in self._starts.finditer(text) if self._starts else ():
            start = candidate.start()
            found += [
                (start, start + n)
                for n in self._lengths
                if start + n <= len(text) and text[start : start + n] in self._texts
            ]
        return found

    def edge_fragments(self, text: str) -> list[Span]:
        """The longest start of `text` that ends a control string and the longest end that
        begins one: beside other text they could complete a control token."""
        longest = self._lengths[-1] if self._lengths else 0
        sizes = range(min(longest - 1, len(text)), 0, -1)
        head = next((k for k in sizes if text[:k] in self._tails), 0)
        tail = next((k for k in sizes if text[-k:] in self._heads), 0)
        return [span for span in ((0, head), (len(text) - tail, len(text))) if span[0] < span[1]]


class ChatTemplate:
    """A Jinja chat template, rendered as Hugging Face transformers renders it."""

    def __init__(
        self, source: str, control: ControlTexts, bos_token: str = "", eos_token: str = ""
    ) -> None:
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as error:
            raise ValueError(f"the chat template does not parse: {error}") from None
        self.control = control
        self._special = {"bos_token": bos_token, "eos_token": eos_token}

    def encode(self, messages: Sequence[ChatMessage], tokenizer: Tokenizer) -> tuple[int, ...]:
        """The prompt's tokens: control tokens only where the template wrote them."""
        pieces = self._pieces(self.render(messages))
        return tuple(t for text, special in pieces for t in tokenizer.tokenize(text, special))

    def render(self, messages: Sequence[ChatMessage]) -> RenderedChat:
        """The prompt text and where the messages' text is in it (see the module doc)."""
        roles, contents = [m.role for m in messages], [m.content for m in messages]
        text = self._render(roles, contents)
        spans = self._message_spans(roles, contents, text)
        if spans is not None:
            return RenderedChat(text, spans)
        return self._render_neutralized(roles, contents)

    def _render(self, roles: Sequence[str], contents: Sequence[str]) -> str:
        messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, **self._special
            )
        except _TEMPLATE_ERRORS as error:
            raise ValueError(str(error) or type(error).__name__) from None

    def _message_spans(
        self, roles: Sequence[str], contents: Sequence[str], real: str
    ) -> tuple[Span, ...] | None:
        """Each message's span in `real`, from renders with markers; None if unsure."""
        markers = [f"{_MARK_OPEN}{i}{_MARK_CLOSE}" for i in range(len(contents))]
        try:
            bare = self._render(roles, markers)
            padded = self._render(roles, [_PAD + m + _PAD for m in markers])
        except ValueError:  # the template looks at the text (e.g. tests it): not opaque
            return None
        if any(bare.count(m) != 1 or padded.count(m) != 1 for m in markers):
            return None
        text, spans, cursor = "", [], 0
        for i in sorted(range(len(markers)), key=lambda i: bare.index(markers[i])):
            at = bare.index(markers[i])
            content = _trim_like(contents[i], padded, padded.index(markers[i]), markers[i])
            text += bare[cursor:at]
            spans.append((len(text), len(text) + len(content)))
            text += content
            cursor = at + len(markers[i])
        text += bare[cursor:]
        return tuple(spans) if text == real else None

    def _render_neutralized(self, roles: Sequence[str], contents: Sequence[str]) -> RenderedChat:
        """Render with control strings (and edge fragments) in messages as placeholders."""
        literals: list[str] = []
        neutral = [self._neutralize(content, literals) for content in contents]
        rendered = self._render(roles, neutral)
        text, spans, cursor = "", [], 0
        for match in _PLACEHOLDER.finditer(rendered):
            literal = literals[int(match.group(1))]
            text += rendered[cursor : match.start()]
            spans.append((len(text), len(text) + len(literal)))
            text += literal
            cursor = match.end()
        return RenderedChat(text + rendered[cursor:], tuple(spans))

    def _neutralize(self, content: str, literals: list[str]) -> str:
        stripped_from = len(content) - len(content.lstrip())
        risky = self.control.occurrences(content) + self.control.edge_fragments(content)
        risky += [m.span() for m in re.finditer(_MARK_OPEN, content)]  # no fake placeholder
        risky += [
            (start + stripped_from, end + stripped_from)
            for start, end in self.control.edge_fragments(content.strip())
        ]
        out, cursor = "", 0
        for start, end in _merge(risky):
            out += content[cursor:start] + f"{_MARK_OPEN}fs{len(literals)}{_MARK_CLOSE}"
            literals.append(content[start:end])
            cursor = end
        return out + content[cursor:]

    def _pieces(self, rendered: RenderedChat) -> list[tuple[str, bool]]:
        """The prompt cut into (text, parse special tokens?) pieces, in order."""
        pieces, cursor = [], 0
        for start, end in self._plain_spans(rendered):
            pieces += [(rendered.text[cursor:start], True), (rendered.text[start:end], False)]
            cursor = end
        pieces.append((rendered.text[cursor:], True))
        return [(text, special) for text, special in pieces if text]

    def _plain_spans(self, rendered: RenderedChat) -> list[Span]:
        """Message characters that are part of a control string in the prompt."""
        from_message = bytearray(len(rendered.text))
        for start, end in rendered.untrusted:
            from_message[start:end] = b"\x01" * (end - start)
        plain = bytearray(len(rendered.text))
        for start, end in self.control.occurrences(rendered.text):
            if any(from_message[start:end]):
                for i in range(start, end):
                    plain[i] |= from_message[i]
        return [m.span() for m in re.finditer(b"\x01+", bytes(plain))]


def _trim_like(content: str, padded: str, at: int, marker: str) -> str:
    """`content` trimmed on each side where the template trimmed the padded marker at `at`."""
    if padded[max(0, at - len(_PAD)) : at] != _PAD:
        content = content.lstrip()
    if padded[at + len(marker) : at + len(marker) + len(_PAD)] != _PAD:
        content = content.rstrip()
    return content


def _merge(spans: Iterable[Span]) -> list[Span]:
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # As transformers does: Jinja's own tojson escapes HTML, which templates do not expect.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
