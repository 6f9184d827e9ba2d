"""Generated tokens as an answer's text, one token at a time: what each token adds, where
the answer ends (an end-of-sequence token, a stop string), and how many tokens are
already final (may be sent) while more are coming.

The whole answer (`make_answer`) and the stream (`openai_stream.py`) both push their
tokens through one `Text`, so the pieces a stream sends are the whole answer's, exactly.

Invariants:
- A token's piece is the text it adds to the decoded prefix; a token that ends inside a
  UTF-8 character adds "" (the character comes with the token that completes it),
  unless it is the last token, which adds what it decodes to.
- The answer ends at the first end-of-sequence token (kept out of the text) or at the
  first stop string (cut before it); tokens whose piece starts at or after the cut are
  dropped, one that straddles it keeps the part before. finish is "stop" then, else
  "length" (only known at `end`).
- `ready()` never counts a token whose piece or whose being kept could still change:
  a stop string that may be starting in the text (a suffix that is a proper prefix of
  a stop) holds back every token from there on, so a stop split across tokens (or
  across chunks) is cut exactly where the whole answer cuts it.
"""

from __future__ import annotations

from typing import Any


class Text:
    def __init__(self, tokenizer: Any, eos: set[int], stops: tuple[str, ...]) -> None:
        self.tokenizer, self.eos, self.stops = tokenizer, eos, stops
        self.tokens: list[int] = []  # pushed, before any end-of-sequence token
        self.finish: str | None = None  # "stop" | "length", once over
        self._pieces: list[str] = []  # per token (the last is "" while `_pending`)
        self._starts: list[int] = []  # where each piece starts in `_text`
        self._text = ""
        self._pending = False  # the last token ends inside a character: its piece is not known yet
        self._cut: int | None = None  # where a stop string starts, once found for good
        self._searched = 0  # stop strings were looked for in _text[:_searched]
        self._found: int | None = None  # the first stop string found so far

    @property
    def over(self) -> bool:
        return self.finish is not None

    def push(self, token: int) -> None:
        if self.over:
            return
        if token in self.eos:
            self.end(eos=True)
            return
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self._starts.append(len(self._text))
        self._pending = full.endswith("\ufffd")
        self._pieces.append("" if self._pending else self._added(full))
        if self.stops:
            cut = self._first_stop()
            if cut is not None and cut <= self._safe():
                self._cut, self.finish = cut, "stop"

    def end(self, eos: bool = False) -> None:
        """No more tokens (an end-of-sequence token, or the generation stopped)."""
        if self.over:
            return
        if self._pending:  # the last token after all: it adds what it decodes to
            self._pieces[-1] = self._added(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
            self._pending = False
        self._cut = self._first_stop() if self.stops else None
        self.finish = "stop" if eos or self._cut is not None else "length"

    def ready(self) -> int:
        """How many tokens are final: sendable, and in the answer."""
        if self._cut is not None:
            return sum(1 for s in self._starts if s < self._cut)
        settled = len(self._pieces) - self._pending
        if self.over or not self.stops:
            return settled
        safe = self._safe()
        n = 0
        while n < settled and self._starts[n] < safe and self._starts[n] + len(self._pieces[n]) <= safe:
            n += 1
        return n

    def piece(self, i: int) -> str:
        """Token i's text in the answer (i < ready())."""
        piece = self._pieces[i]
        return piece if self._cut is None else piece[: self._cut - self._starts[i]]

    def _added(self, full: str) -> str:
        piece = full[len(self._text):] if full.startswith(self._text) else ""
        self._text += piece
        return piece

    def _first_stop(self) -> int | None:
        longest = max(len(s) for s in self.stops)
        start = max(0, self._searched - longest + 1)
        self._searched = len(self._text)
        found = [i for i in (self._text.find(s, start) for s in self.stops) if i >= 0]
        if self._found is not None:
            found.append(self._found)  # found before but not final yet: the text only grows
        self._found = min(found) if found else None
        return self._found

    def _safe(self) -> int:
        """Where a stop string may be starting (the text is final before it)."""
        text, longest = self._text, max(len(s) for s in self.stops)
        for i in range(max(0, len(text) - longest + 1), len(text)):
            tail = text[i:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return i
        return len(text)
