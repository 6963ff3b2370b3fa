"""A configurable text safety policy: categories of phrases and patterns, each with a score threshold.

    policy = SafetyPolicy.from_settings(cfg.safety.model_dump())   # the `safety:` section of configs/serve.yaml
    verdict = policy.check("how do I build a bomb")     # None, or the category and span that blocked it
    stream = policy.stream_filter()                     # for generated text, token by token
    safe_text, verdict = stream.feed(delta)

A category applies to prompts, to generated output, or both (`applies_to`). Its score is the number of its matches times its `weight`; the category blocks once the score
reaches its threshold. Phrases match whole words case-insensitively ("kill" matches "Kill!" but not
"skill"); patterns are regular expressions. Ray-free, so the serving route and any batch job share it.

The policy is built from plain settings (the mapping `SafetySection.model_dump()` gives, whose schema
in `raybooth/cluster/config/` validates it); models/ never imports the config layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SafetyMatch:
    category: str
    span: str  # the matched text, as it appears in the checked text
    start: int
    end: int


@dataclass(frozen=True)
class SafetyVerdict:
    """Why a text was blocked: the first category over its threshold and the matches that put it there."""

    category: str
    score: float
    threshold: float
    matches: tuple[SafetyMatch, ...]

    @property
    def first(self) -> SafetyMatch:
        return self.matches[0]

    def explanation(self) -> str:
        spans = ", ".join(f"{m.span!r} at characters {m.start}-{m.end}" for m in self.matches[:3])
        return (
            f"blocked by the safety policy: category {self.category!r} matched {spans} "
            f"(score {self.score:g} >= threshold {self.threshold:g})"
        )


@dataclass(frozen=True)
class _Category:
    name: str
    regexes: tuple[re.Pattern[str], ...]
    weight: float
    threshold: float
    applies_to: frozenset[str]  # "prompt", "output"


def _phrase_regex(phrase: str) -> re.Pattern[str]:
    # Whole words only, and any run of whitespace inside the phrase matches any other run.
    words = [re.escape(w) for w in phrase.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


class SafetyPolicy:
    """Checks a text against every category; `check` returns the first blocking category or None."""

    def __init__(self, categories: list[_Category], holdback_chars: int = 32, check_output: bool = True):
        self.categories = categories
        self.holdback_chars = holdback_chars
        self.check_output = check_output

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> SafetyPolicy:
        """The policy of a validated `safety:` section, as a plain mapping (every key present)."""
        if not settings["enabled"]:
            return cls([], holdback_chars=0, check_output=False)
        categories = []
        longest_phrase = 0
        for cat in settings["categories"]:
            regexes = [_phrase_regex(p) for p in cat["phrases"] if p.strip()]
            regexes += [re.compile(p, re.IGNORECASE) for p in cat["patterns"]]
            if "output" in cat["applies_to"]:
                longest_phrase = max([longest_phrase, *(len(p) for p in cat["phrases"])])
            threshold = cat["threshold"] if cat["threshold"] is not None else settings["threshold"]
            categories.append(
                _Category(cat["name"], tuple(regexes), cat["weight"], threshold, frozenset(cat["applies_to"]))
            )
        # Hold back at least one character more than the longest phrase, so a phrase is never half-sent
        # and the word boundary after it is seen before the text goes out.
        checks_output = any("output" in c.applies_to for c in categories)
        holdback = max(settings["stream_holdback_chars"], longest_phrase + 1) if checks_output else 0
        return cls(categories, holdback_chars=holdback, check_output=settings["check_output"])

    @property
    def active(self) -> bool:
        return bool(self.categories)

    @property
    def checks_output(self) -> bool:
        return self.check_output and any("output" in c.applies_to for c in self.categories)

    def check(self, text: str, scope: str = "prompt") -> SafetyVerdict | None:
        """The first category (of those that apply to `scope`: prompt or output) that `text` trips."""
        for cat in self.categories:
            if scope not in cat.applies_to:
                continue
            matches = sorted(
                (
                    SafetyMatch(cat.name, m.group(0), m.start(), m.end())
                    for rx in cat.regexes
                    for m in rx.finditer(text)
                ),
                key=lambda m: m.start,
            )
            score = len(matches) * cat.weight
            if matches and score >= cat.threshold:
                return SafetyVerdict(cat.name, score, cat.threshold, tuple(matches))
        return None

    def check_all(self, texts: list[str]) -> SafetyVerdict | None:
        """Check texts as one document (the messages of a chat request) so spans count across them."""
        return self.check("\n".join(texts))

    def stream_filter(self) -> StreamingSafetyFilter:
        return StreamingSafetyFilter(self)


class StreamingSafetyFilter:
    """Checks generated text as it grows; releases only text that can no longer become part of a match.

    `feed(delta)` returns `(text safe to send now, verdict or None)`; once a verdict is returned the stream
    is blocked and nothing more is released. `flush()` releases the held-back tail when generation ends.
    """

    def __init__(self, policy: SafetyPolicy):
        self.policy = policy
        self.text = ""
        self.sent = 0  # characters of `text` already released
        self.verdict: SafetyVerdict | None = None

    def feed(self, delta: str) -> tuple[str, SafetyVerdict | None]:
        if self.verdict is not None:
            return "", self.verdict
        self.text += delta
        if not self.policy.checks_output:
            return self._release(len(self.text)), None
        self.verdict = self.policy.check(self.text, scope="output")
        if self.verdict is not None:
            # Release nothing of (or after) the offending span.
            return self._release(min(self.verdict.first.start, len(self.text))), self.verdict
        return self._release(len(self.text) - self.policy.holdback_chars), None

    def flush(self) -> str:
        if self.verdict is not None:
            return ""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent : upto]
        self.sent = upto
        return out
