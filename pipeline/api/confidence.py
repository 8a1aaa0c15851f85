"""How sure the model was of its label, read from the reply's token logprobs.

The confidence of a label is the probability of the tokens that spell it in the reply: the product of their
probabilities, exp(sum of logprobs). Where the reply also lists alternatives (`top_logprobs`), the mass that
went to tokens which would have begun a *different* label, at the point where the label starts, is set beside
it and the confidence is renormalised over the labels: p / (p + p_other). Mass on tokens that begin no label
is left out: a strict schema could not have chosen them. For several labels (multi-label) the confidence is
that of the least sure one. Replies without logprobs, or whose tokens do not spell the content, give None.

The tokens may hold more than the content: self-hosted servers (vLLM) end `logprobs.content` with the stop token
(`</s>`, `<|eot_id|>`, `<|im_end|>`), which the message text leaves out, and a grammar-constrained model may pad
the JSON with whitespace that a server or gateway trims from the text. The content is looked for inside the
tokens' text with nothing but such tokens around it (`locate`). Tokens decoded one at a time may also have lost a
leading space (SentencePiece tokenizers drop it), so tokens that spell the content but for whitespace are
accepted too, compared without whitespace (`respell`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

# Why a labeled row has no confidence, as far as a sink can tell: it keeps no trace of which case it was (the run's
# summary says when logprobs came and could not be read), so never claim "the endpoint sent none".
WHY_NO_CONFIDENCE: Final = "their replies carried no logprobs, or logprobs that do not spell the reply"


def label_confidence(
    content: str, tokens: Any, chosen: str | Sequence[str], field: str, labels: Iterable[str]
) -> float | None:
    """The probability of the chosen label(s) in `content` given its logprob `tokens` (None if unknowable).

    `field` names the JSON key that holds the label(s); `labels` is the task's whole label set.
    """
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, Mapping) for t in tokens):
        return None
    spans = _value_spans(content, field)
    if not spans:
        return None
    aligned = _align(content, tokens, spans)
    if aligned is None:
        return None  # the tokens do not spell the content: nothing can be located in it
    pieces, data, encode, spans = aligned
    starts = list(itertools.accumulate((len(x) for x in pieces), initial=0))
    wanted = {label.casefold() for label in ([chosen] if isinstance(chosen, str) else chosen)}
    sure: list[float] = []
    for start, end, value in spans:
        if value.strip().casefold() not in wanted:
            continue
        covering = [i for i in range(len(pieces)) if starts[i] < end and starts[i + 1] > start]
        if not covering:
            return None
        try:
            logprob = sum(float(tokens[i]["logprob"]) for i in covering)
        except (KeyError, TypeError, ValueError):
            return None
        p = math.exp(min(0.0, logprob))
        first = covering[0]
        rivals = [encode(label) for label in labels if label != value]
        piece, lead = pieces[first], data[starts[first] : start]
        if encode is _squeeze:
            piece, lead = _squeeze(piece), _squeeze(lead)
        other = _rival_mass(tokens[first], piece, lead, rivals, encode)
        # Without alternatives to compare (top_logprobs not asked for), the raw probability is all there is.
        sure.append(p if other is None else p / (p + other) if p + other > 0 else 0.0)
    return round(min(sure), 4) if sure else None


Aligned = tuple[Sequence[Any], Any, Callable[[str], Any], list[tuple[int, int, str]]]


def _align(content: str, tokens: Sequence[Mapping[str, Any]], spans: list[tuple[int, int, str]]) -> Aligned | None:
    """The tokens' pieces (all str or all bytes), the text they join to, how to encode a label to compare with
    them, and the label spans moved into that text; None when the tokens do not spell the content."""
    texts: list[Any] = [t.get("token") for t in tokens]
    strings = all(isinstance(x, str) for x in texts)
    # Usually the token strings spell the content; a token that splits a character needs its bytes instead.
    at = locate(texts, content, texts) if strings else None
    if at is not None:
        return texts, "".join(texts), _same, [(a + at, b + at, v) for a, b, v in spans]
    raw = _token_bytes(tokens)
    at = locate(raw, content.encode("utf-8"), texts) if raw is not None else None
    if raw is not None and at is not None:
        moved = [(len(content[:a].encode()) + at, len(content[:b].encode()) + at, v) for a, b, v in spans]
        return raw, b"".join(raw), _utf8, moved
    respelled = respell(texts, content) if strings else None
    return (respelled, content, _squeeze, spans) if respelled is not None else None


def respell(texts: Sequence[str], content: str) -> list[str] | None:
    """One piece of `content` per token, for tokens that spell it but for whitespace (padding and special tokens
    around it take no piece; the content's whitespace goes with the token after it); None if they do not."""

    def padding(text: str) -> bool:
        return _special(text) or not text.strip()

    first, last = 0, len(texts)
    while last > first and padding(texts[last - 1]):
        last -= 1
    while first < last and padding(texts[first]):
        first += 1
    pieces = [""] * len(texts)
    at = done = 0  # `at`: the next content character to match; `done`: where the last piece ended
    for i in range(first, last):
        for char in texts[i]:
            if char.isspace():
                continue
            while at < len(content) and content[at].isspace():
                at += 1
            if at >= len(content) or content[at] != char:
                return None
            at += 1
        pieces[i], done = content[done:at], at
    if first == last or content[done:].strip():
        return None
    pieces[last - 1] += content[done:]
    return pieces


def locate(pieces: Sequence[Any], content: Any, names: Sequence[Any]) -> int | None:
    """Where `content` starts in the joined `pieces` (all str or all bytes), or None when they do not spell it.

    Around the content there may be only padding: stop or special tokens (`names[i]`, the token's string, looks
    like `<...>`: `</s>`, `<|eot_id|>`, `<|im_end|>`), and whitespace (also the whitespace part of a token that
    straddles the content's edge). Anything else means the tokens belong to another text.
    """
    joined = pieces[0][:0].join(pieces) if pieces else content[:0]
    if joined == content:
        return 0
    at = joined.find(content) if content else -1
    if at < 0:
        return None
    end = at + len(content)
    start = 0
    for piece, name in zip(pieces, names, strict=True):
        stop = start + len(piece)
        if stop <= at or start >= end:  # wholly outside the content: whitespace or a special token
            if piece.strip() and not _special(name):
                return None
        elif (start < at and piece[: at - start].strip()) or (stop > end and piece[end - start :].strip()):
            return None  # a token reaching past the content's edge may only bring whitespace
        start = stop
    return at


def _special(name: Any) -> bool:
    """Whether a token's string is a special token's (`</s>`, `<|eot_id|>`, `<end_of_turn>`), never message text."""
    return isinstance(name, str) and len(name) >= 3 and name.startswith("<") and name.endswith(">")


def _same(text: str) -> str:
    return text


def _squeeze(text: str) -> str:
    return "".join(text.split())


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _token_bytes(tokens: Sequence[Mapping[str, Any]]) -> list[bytes] | None:
    pieces = []
    for token in tokens:
        raw = token.get("bytes")
        if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
            pieces.append(bytes(raw))
        elif isinstance(token.get("token"), str):
            pieces.append(_utf8(token["token"]))
        else:
            return None
    return pieces


def _rival_mass(
    token: Mapping[str, Any], piece: Any, lead: Any, rivals: Sequence[Any], encode: Callable[[str], Any]
) -> float | None:
    """Probability of the alternatives at this position that would have begun another label (None: the reply
    lists no alternative to the chosen token). `piece`, `lead` and `rivals` are all str or all bytes."""
    alternatives = token.get("top_logprobs")
    if not isinstance(alternatives, list):
        return None
    mass, compared = 0.0, False
    closing = encode('"')
    for alt in alternatives:
        if not isinstance(alt, Mapping) or not isinstance(alt.get("token"), str):
            continue
        raw = alt.get("bytes")
        text = bytes(raw) if encode is _utf8 and isinstance(raw, list) else encode(alt["token"])
        if text == piece:
            continue
        compared = True
        if not text.startswith(lead):
            continue
        rest = text[len(lead) :]
        if rest and any(r.startswith(rest) or rest.startswith(r + closing) for r in rivals):
            try:
                mass += math.exp(min(0.0, float(alt["logprob"])))
            except (KeyError, TypeError, ValueError):
                continue
    return mass if compared else None


def _value_spans(content: str, field: str) -> list[tuple[int, int, str]]:
    """Character spans (start, end, decoded value) of the string value(s) of `field` in a JSON reply text."""
    key = orjson.dumps(field).decode()
    at = content.find(key)
    while at >= 0:
        i = _skip_space(content, at + len(key))
        if i < len(content) and content[i] == ":":
            break
        at = content.find(key, at + 1)
    if at < 0:
        return []
    i = _skip_space(content, i + 1)
    spans = []
    if i < len(content) and content[i] == "[":
        i = _skip_space(content, i + 1)
        while i < len(content) and content[i] == '"':
            span = _string_at(content, i)
            if span is None:
                break
            spans.append(span[0])
            i = _skip_space(content, span[1])
            if i < len(content) and content[i] == ",":
                i = _skip_space(content, i + 1)
    elif i < len(content) and content[i] == '"':
        span = _string_at(content, i)
        if span is not None:
            spans.append(span[0])
    return spans


def _string_at(content: str, quote: int) -> tuple[tuple[int, int, str], int] | None:
    """The JSON string starting at `quote`: ((start, end, value) of its inside, index after the closing quote)."""
    i = quote + 1
    while i < len(content) and content[i] != '"':
        i += 2 if content[i] == "\\" else 1
    if i >= len(content):
        return None
    try:
        value = orjson.loads(content[quote : i + 1])
    except orjson.JSONDecodeError:
        return None
    return (quote + 1, i, str(value)), i + 1


def _skip_space(content: str, i: int) -> int:
    while i < len(content) and content[i] in " \t\r\n":
        i += 1
    return i
