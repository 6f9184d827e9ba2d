"""openai_text.Text, token by token, against the whole-answer rule written out plainly
(decode every prefix, cut at the first end-of-sequence token, then at the first stop
string): what a stream sends is final the moment it is sent, and adds up to the answer.

Tokens are bytes (a byte-level tokenizer: a token may end inside a UTF-8 character), over
a small alphabet so that stop strings, partial stops and split characters are common.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nnglass.server.openai_text import Text

EOS = 256
ALPHABET = [ord("a"), ord("b"), 0xC3, 0xA9, EOS]  # "é" is b"\xc3\xa9": two tokens


class Bytes:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i != EOS).decode("utf-8", errors="replace")


def whole(tokens: list[int], stops: tuple[str, ...]) -> tuple[list[str], str]:
    """The answer's pieces and finish reason, from the whole generation at once."""
    if EOS in tokens:
        tokens, finish = tokens[: tokens.index(EOS)], "stop"
    else:
        finish = "length"
    pieces, text = [], ""
    for i in range(len(tokens)):
        full = Bytes().decode(tokens[: i + 1])
        if full.endswith("\ufffd") and i + 1 < len(tokens):
            pieces.append("")
            continue
        pieces.append(full[len(text):] if full.startswith(text) else "")
        text += pieces[-1]
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        cut, kept, total = min(found), [], 0
        for piece in pieces:
            if total >= cut:
                break
            kept.append(piece[: cut - total])
            total += len(piece)
        pieces, finish = kept, "stop"
    return pieces, finish


stops = st.lists(st.text(alphabet="abé", min_size=1, max_size=4), max_size=3).map(tuple)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=24), stops)
def test_streamed_pieces_are_final_when_ready_and_add_up_to_the_answer(tokens: list[int],
                                                                       stop: tuple[str, ...]) -> None:
    want, finish = whole(tokens, stop)
    text = Text(Bytes(), {EOS}, stop)
    sent: list[str] = []
    for t in tokens:
        text.push(t)
        n = text.ready()
        assert n >= len(sent)  # what was ready stays ready, with the same text
        assert [text.piece(i) for i in range(len(sent))] == sent
        sent += [text.piece(i) for i in range(len(sent), n)]
        assert sent == want[: len(sent)]
    text.end()
    assert [text.piece(i) for i in range(text.ready())] == want
    assert text.finish == finish


@given(st.lists(st.sampled_from([ord("a"), ord("b")]), max_size=16))
def test_without_stops_each_token_is_ready_as_it_comes(tokens: list[int]) -> None:
    text = Text(Bytes(), {EOS}, ())
    for k, t in enumerate(tokens):
        text.push(t)
        assert text.ready() == k + 1


def test_a_stop_split_across_tokens_holds_them_until_it_is_settled() -> None:
    text = Text(Bytes(), {EOS}, ("bab",))
    for t in b"aba":
        text.push(t)
    assert text.ready() == 1  # "ba" may start "bab"
    text.push(ord("a"))  # "baa": no; but the last "a"... cannot start "bab"
    assert text.ready() == 4 and not text.over
    for t in b"bab":
        text.push(t)
    assert text.over and text.finish == "stop"
    assert "".join(text.piece(i) for i in range(text.ready())) == "abaa"
