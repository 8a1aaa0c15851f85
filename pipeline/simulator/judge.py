"""Plausible labels for the simulator: each label scored against the request's own label descriptions and examples.

A labeling request names its labels in the system prompt ("- positive: The writer is pleased, ...") and may
show examples as user/assistant pairs. The judge turns every label's description and examples into a bag of
features (lower-cased words, the first five letters of longer Latin words, and the character pairs of Hangul
and other wide-script words) and scores a text by the features it shares with each label, each feature
weighted by how few labels use it. The best score wins; ties and texts that share nothing fall back to the
hash of the text, as before. No judgment, no lexicon of its own: a deterministic text-similarity rule, enough
to make a demo's labels look like what the task file asks for, and scores that become logprobs.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

_CATALOGUE_LINE: Final = re.compile(r"^- (\S(?:.*?\S)?): (.+)$", re.MULTILINE)
_WORD: Final = re.compile(r"\w+")
_CACHE_SIZE: Final = 64
# How sharply scores turn into probabilities: a clear winner gets ~0.9 or more, a near tie ~0.5.
_SHARPNESS: Final = 2.0


def features(text: str) -> set[str]:
    """The features of a text: words, five-letter stems of longer Latin words, pairs of wide characters."""
    out: set[str] = set()
    for word in _WORD.findall(text.casefold()):
        if word.isdigit():
            continue
        if word.isascii():
            if len(word) > 2:
                out.add(word)
                if len(word) > 5:
                    out.add(word[:5] + "~")
        else:
            out.add(word)
            out.update(word[i : i + 2] for i in range(len(word) - 1))
    return out


class Profiles:
    """The features of each label of one prompt, with a weight per feature (rarer across labels: heavier)."""

    __slots__ = ("labels", "weights")

    def __init__(self, texts: Mapping[str, list[str]]) -> None:
        self.labels = tuple(texts)
        bags = {label: set().union(*(features(t) for t in parts)) for label, parts in texts.items()}
        count = len(bags)
        users: dict[str, list[str]] = {}
        for label, bag in bags.items():
            for feature in bag:
                users.setdefault(feature, []).append(label)
        # A feature every label uses says nothing; one label's own feature says the most.
        self.weights: dict[str, list[tuple[str, float]]] = {
            feature: [(label, math.log((1 + count) / len(owners))) for label in owners]
            for feature, owners in users.items()
            if len(owners) < count
        }

    def scores(self, text: str) -> dict[str, float]:
        """Each label's score for `text` (0 when it shares nothing with the label)."""
        out = dict.fromkeys(self.labels, 0.0)
        for feature in features(text):
            for label, weight in self.weights.get(feature, ()):
                out[label] += weight
        return out


class Judge:
    """Finds a request's label catalogue and examples, and scores its last user message against them."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[str, ...], Profiles | None] = {}

    def scores(self, messages: Sequence[Any]) -> dict[str, float] | None:
        """Label scores for the last user message, or None when the prompt names no labels or nothing matches."""
        prefix = tuple(_text(m) for m in messages[:-1]) + tuple(_role(m) for m in messages[:-1])
        profiles = self._cache.get(prefix, ...)
        if profiles is ...:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            profiles = self._cache[prefix] = _profiles(messages[:-1])
        if profiles is None or not messages:
            return None
        scores = profiles.scores(_text(messages[-1]))
        return scores if any(scores.values()) else None


def _profiles(prefix: Sequence[Any]) -> Profiles | None:
    descriptions: dict[str, list[str]] = {}
    for message in prefix:
        if _role(message) == "system":
            for label, description in _CATALOGUE_LINE.findall(_text(message)):
                descriptions.setdefault(label, []).append(description)
    if len(descriptions) < 2:
        return None
    for asked, answer in itertools.pairwise(prefix):
        if _role(asked) == "user" and _role(answer) == "assistant":
            for label in _labels_in(_text(answer)):
                if label in descriptions:
                    descriptions[label].append(_text(asked))
    return Profiles(descriptions)


def _labels_in(content: str) -> list[str]:
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(value, dict):
        return []
    got = value.get("label", value.get("labels"))
    items = [got] if isinstance(got, str) else got if isinstance(got, list) else []
    return [x for x in items if isinstance(x, str)]


def _role(message: Any) -> str:
    return str(message.get("role", "")) if isinstance(message, dict) else ""


def _text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def as_model_of_quality(scores: Mapping[str, float], model: str, text: str, quality: float) -> Mapping[str, float]:
    """The scores a model of `quality` (a simulation: the share of rows it gets as the judge does) acts on.

    A hash of the model and the text decides, so a row always gets the same answer from the same model and
    different models slip on different rows; on a slip the judge's best label is ruled out and the next wins,
    with the lower probability a near tie gives (weak models are less sure where they are wrong).
    """
    digest = hashlib.blake2b(f"{model}\0{text}".encode("utf-8", "replace"), digest_size=8).digest()
    if int.from_bytes(digest) / 2**64 < quality:
        return scores
    best = max(scores, key=lambda label: scores[label])
    return {label: -1.0 if label == best else score for label, score in scores.items()}


def probabilities(scores: Mapping[str, float], values: Sequence[Any]) -> list[float]:
    """How likely each of `values` is given its score: (score + 1) ** sharpness, normalised; values the scores
    do not know get none of the mass (all equal when none is known)."""
    weights = [(scores[v] + 1) ** _SHARPNESS if isinstance(v, str) and v in scores else 0.0 for v in values]
    total = sum(weights)
    return [w / total for w in weights] if total else [1 / len(values)] * len(values)


_TOKEN: Final = re.compile(r"[A-Za-z]+|\d{1,3}|\s+|[^\w\s]|\w", re.UNICODE)
_SURE: Final = -0.0001  # the logprob of a token the schema leaves no choice about


Rivals = Sequence[tuple[str, float]]


def token_logprobs(content: str, choices: Sequence[tuple[str, float, Rivals]], top: int) -> list[dict[str, Any]]:
    """`logprobs.content` for a reply: one entry per token of `content`.

    `choices` lists, for each value the model chose (a label), the value, its probability and its rivals
    (other values with theirs): the value's first token carries the choice, the rivals' first tokens appear
    in its `top_logprobs`; every other token is nearly certain.
    """
    starts: dict[int, tuple[float, Rivals]] = {}
    for value, probability, rivals in choices:
        at = content.find(orjson.dumps(value).decode())
        if at >= 0:
            starts[at + 1] = (probability, rivals)
    out = []
    for match in _TOKEN.finditer(content):
        token = match.group()
        if match.start() not in starts:
            out.append(_certain(token, top))
            continue
        probability, rivals = starts[match.start()]
        logprob = math.log(max(probability, 1e-9))
        best = {token: logprob}
        for rival, p in rivals:
            if p > 0 and (first := _TOKEN.match(rival)) is not None and first.group() not in best:
                best[first.group()] = math.log(p)
        alternatives = sorted(best.items(), key=lambda alt: -alt[1])
        entry = _alternative(token, logprob)
        entry["top_logprobs"] = [_alternative(t, lp) for t, lp in alternatives[:top]]
        out.append(entry)
    return out


def stop_token(token: str, top: int) -> dict[str, Any]:
    """The `logprobs.content` entry of a stop token a server lists after the text (vLLM's `</s>`)."""
    entry = _alternative(token, _SURE)
    entry["top_logprobs"] = [_alternative(token, _SURE)] if top else []
    return entry


@functools.lru_cache(maxsize=4096)
def _certain(token: str, top: int) -> dict[str, Any]:
    """The entry of a token the schema leaves no choice about; shared between replies (never mutated)."""
    entry = _alternative(token, _SURE)
    entry["top_logprobs"] = [_alternative(token, _SURE)] if top else []
    return entry


def _alternative(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": round(logprob, 6), "bytes": list(token.encode("utf-8"))}
