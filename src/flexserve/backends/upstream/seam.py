"""Where a resumed answer joins what the client already has: the first chunks of a
resumed upstream call, made to follow on without a repeat or a gap.

Two engines' ways need mending there:
- llama-server's chat API repeats a continued assistant message at the start of its
  answer (`EchoedPrefix` drops it).
- At a pause the engine may hold text back: text that may be the start of a stop string
  was streamed with no text (and a token that ends inside a UTF-8 character, with no
  chunk at all: `stream._read_native` counts it). A
  token-level resume that sent its id would never get that text (the engine releases
  it with a later token of the *same* call; the new call does not know it) and would
  not see a stop string that spans the pause. So those trailing tokens are not sent:
  the engine generates them again, and as the client was already counted for them, the
  first ones the new call streams are not counted again (their text goes on with the
  next token, or with the finish).
"""

from __future__ import annotations

from collections.abc import Sequence

from flexserve.backends.base import TokenChunk
from flexserve.backends.upstream.continuation import EchoedPrefix
from flexserve.backends.upstream.stream import UPSTREAM_TOKEN, TextDelta


class Seam:
    def __init__(self, resume: Sequence[TokenChunk], *, echoes: bool) -> None:
        self.regenerate = held_tokens(resume)
        """Trailing tokens of `resume` whose text was held back: generated again (in a
        text-level resume too, where their text was never sent: not counted twice)."""
        self.sent = resume[: len(resume) - self.regenerate] if self.regenerate else resume
        """What the resumed call is given as produced (ids or text)."""
        partial = "".join(chunk.text for chunk in resume) if echoes and resume else ""
        self._echo = EchoedPrefix(partial) if partial else None
        self._uncounted = self.regenerate
        self._carry = ""
        self.streamed = 0
        """Tokens the engine streamed in this call, counted or not."""
        self.ended = False
        """The call reached the engine's finish (its usage counted what it sampled)."""
        self.passed = self._echo is None and not self.regenerate
        """Nothing left to mend: each token goes to the client as it comes."""

    def chunks(self, delta: TextDelta) -> list[TokenChunk]:
        """The chunks of `delta` the client gets, each one token it is counted for."""
        if self._echo is not None and delta.text:  # the first delta with text, only
            delta = TextDelta(self._echo.after_echo(delta.text), delta.token_ids, delta.unnamed)
            self._echo = None
        tokens = tokens_of(delta)
        self.streamed += len(tokens)
        if not self._uncounted and not self._carry:  # past the seam (or no seam at all)
            self.passed = self._echo is None
            return tokens
        out = []
        for chunk in tokens:
            if self._uncounted:  # generated again for a held token already counted
                self._uncounted -= 1
                self._carry += chunk.text
                continue
            if self._carry:
                chunk = TokenChunk(chunk.token_id, self._carry + chunk.text)
                self._carry = ""
            out.append(chunk)
        return out

    @property
    def held(self) -> str:
        """Text not released yet when the answer ends: it goes with the finish."""
        return self._carry


def held_tokens(resume: Sequence[TokenChunk]) -> int:
    """How many of the last tokens produced released no text."""
    count = 0
    for chunk in reversed(resume):
        if chunk.text:
            break
        count += 1
    return count


def tokens_of(delta: TextDelta) -> list[TokenChunk]:
    """One chunk per token. Where the engine names the tokens (llama-server's native
    stream), each keeps its id; tokens it did not name come first, without one; text
    released by several tokens goes with the last, as held text is released later."""
    if not delta.token_ids:
        return [TokenChunk(UPSTREAM_TOKEN, delta.text)]
    *held, last = delta.token_ids
    unnamed = [TokenChunk(UPSTREAM_TOKEN, "")] * delta.unnamed
    return [*unnamed, *(TokenChunk(i, "") for i in held), TokenChunk(last, delta.text)]
