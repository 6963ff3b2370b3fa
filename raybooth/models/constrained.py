"""JSON-schema constrained decoding with xgrammar: a token bitmask per row per step.

    check_schema({"type": "string", "maxLength": 20})   # GrammarError if refused (limits, admits no value)
    grammars = JSONGrammars(tokenizer, vocab_size=model_vocab)
    matcher = grammars.matcher(params)           # None for unconstrained rows; GrammarError if it cannot compile
    failed = grammars.mask_logits(logits, [matcher, ...])  # logits: (B, V) float32 CPU, in place
    matcher.accept_token(token)

xgrammar compiles the schema into a pushdown automaton over the tokenizer's vocabulary; at each step the
matcher fills a bitmask of tokens that keep the output a valid prefix of a schema-conforming document,
and EOS is allowed only once the document is complete. So even a random model emits valid JSON when it
stops on its own (it can still run out of `max_tokens`: finish_reason "length", as with OpenAI).
Whitespace between tokens is fixed (`any_whitespace=False`), otherwise a weak model can spend its whole
budget on spaces and newlines. Compiled grammars are cached per schema text.

Schemas are checked before xgrammar sees them (`check_schema`, no recursion until the depth is known to be
small): bounded nesting, size and string lengths (compile time grows with the square of a string bound:
minLength 5000 took ~12 s), and a value must exist (`{"$ref": "#"}`, `$defs` that only refer to each other,
`enum: []`, `not: {}` compile into grammars that admit nothing, and would leave a row with no token to sample).
Every refusal is a `GrammarError` (a ValueError: the request's fault) with a message for the user.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import torch
import xgrammar as xgr

from raybooth.models.decoding import SamplingParams
from raybooth.models.schema_checks import LENGTH_KEYS, GrammarError, check_limits, check_schema

__all__ = ["GrammarError", "JSONGrammars", "check_schema", "strict_strings", "user_reason"]

# Distinct schemas kept compiled per engine: a batch job usually has one or a few.
GRAMMAR_CACHE_SIZE = 64
ANY_OBJECT = '{"type": "object"}'
_CPP_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")
_INTERNAL = ("Check failed", "->", "::", "InternalError")


def user_reason(error: BaseException) -> str:
    """The part of a compiler error a user can act on, never its C++ location or internal checks."""
    lines = str(error).strip().splitlines()
    reason = _CPP_PREFIX.sub("", lines[0]).strip() if lines else ""
    if not reason or any(mark in reason for mark in _INTERNAL):
        return "the grammar compiler could not build it; simplify the schema"
    return reason


# JSON text may not hold raw control characters (U+0000-U+001F) in strings. xgrammar's rule for a string
# with minLength/maxLength lets them through (its plain string rule does not), so such strings get the
# equivalent pattern instead: the same characters (no quote or backslash either) without the controls.
_NO_REWRITE_KEYS = ("pattern", "format", "enum", "const")


def strict_strings(schema: Any) -> Any:
    """`schema` with every length-bounded string rewritten as a pattern that excludes control characters."""
    if isinstance(schema, list):
        return [strict_strings(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_strings(value) for key, value in schema.items()}
    bounded = any(key in out for key in LENGTH_KEYS) and not any(key in out for key in _NO_REWRITE_KEYS)
    if out.get("type") == "string" and bounded:
        low = int(out.pop("minLength", 0))
        high = out.pop("maxLength", None)
        out["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{low},{"" if high is None else int(high)}}}$'
    return out


class JSONGrammars:
    def __init__(self, tokenizer: Any, vocab_size: int):
        # vocab_size is the model's logits width: it can exceed len(tokenizer) (padded embedding tables).
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # One thread: the engine runs inside a Ray actor or a Serve replica that already owns its CPUs.
        # xgrammar's own cache off: with it, a pattern grammar compiled after an any-JSON one (json_object,
        # `not`) fails a C++ check (xgrammar 0.2.8); the LRU below caches compiled grammars instead.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        # Callers may compile ahead of a batch from other threads (VLMEngine.check); compiles run unlocked.
        self._lock = threading.Lock()

    def _compile(self, params: SamplingParams) -> xgr.CompiledGrammar:
        if params.json_schema is not None:
            # The limits first: json.dumps below recurses, and a very deep schema would raise RecursionError.
            check_limits(params.json_schema)
        # Not sort_keys: property order is meaningful (xgrammar emits properties in schema order).
        key = json.dumps(params.json_schema) if params.json_schema is not None else "<json_object>"
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        if params.json_schema is not None:
            check_schema(params.json_schema)
        try:
            if params.json_schema is not None:
                # Rewritten only on a miss; the cache is keyed by the schema as the client sent it.
                text = json.dumps(strict_strings(params.json_schema))
                compiled = self.compiler.compile_json_schema(text, any_whitespace=False, strict_mode=True)
            else:
                # OpenAI's json_object means "an object", not any JSON value; strict_mode off so the
                # object may hold any keys (strict mode would forbid every undeclared property).
                compiled = self.compiler.compile_json_schema(
                    ANY_OBJECT, any_whitespace=False, strict_mode=False
                )
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(f"response_format json_schema cannot be compiled: {user_reason(e)}") from e
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, params: SamplingParams) -> xgr.GrammarMatcher | None:
        """A fresh matcher for one row, or None when the row is unconstrained."""
        if not params.constrained:
            return None
        return xgr.GrammarMatcher(self._compile(params))

    def mask_logits(
        self, logits: torch.Tensor, matchers: list[xgr.GrammarMatcher | None]
    ) -> dict[int, Exception]:
        """Set the logits of grammar-forbidden tokens to -inf, in place, for rows that have a matcher.

        logits: (B, V) float32 on the CPU; matchers: one per row (None = leave the row alone). Returns the
        rows whose matcher raised, with the error: those rows are left unmasked and must not be sampled."""
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
        if not rows:
            return {}
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)  # (B, ceil(V/32)) int32
        failed: dict[int, Exception] = {}
        for i in rows:
            try:
                matchers[i].fill_next_token_bitmask(bitmask, i)
            except Exception as e:  # one row's matcher must not take the batch down
                failed[i] = e
        rows = [i for i in rows if i not in failed]
        if rows:
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)
        return failed
