"""JSON-schema constrained decoding with xgrammar: a token bitmask per row per step.

    grammars = JSONGrammars(tokenizer, vocab_size=model_vocab)
    matcher = grammars.matcher(params)           # None for unconstrained rows; GrammarError if it cannot compile
    grammars.mask_logits(logits, [matcher, ...]) # logits: (B, V) float32 CPU, in place
    matcher.accept_token(token)

xgrammar compiles the schema into a pushdown automaton over the tokenizer's vocabulary; at each step the
matcher fills a bitmask of tokens that keep the output a valid prefix of a schema-conforming document,
and EOS is allowed only once the document is complete. So even a random model emits valid JSON when it
stops on its own (it can still run out of `max_tokens`: finish_reason "length", as with OpenAI).
Whitespace between tokens is fixed (`any_whitespace=False`), otherwise a weak model can spend its whole
budget on spaces and newlines. Compiled grammars are cached per schema text.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import torch
import xgrammar as xgr

from raybooth.models.decoding import SamplingParams

# Distinct schemas kept compiled per engine: a batch job usually has one or a few.
GRAMMAR_CACHE_SIZE = 64
ANY_OBJECT = '{"type": "object"}'


class GrammarError(ValueError):
    """A response_format schema that xgrammar cannot compile; the message says why."""


# JSON text may not hold raw control characters (U+0000-U+001F) in strings. xgrammar's rule for a string
# with minLength/maxLength lets them through (its plain string rule does not), so such strings get the
# equivalent pattern instead: the same characters (no quote or backslash either) without the controls.
_LENGTH_KEYS = ("minLength", "maxLength")
_NO_REWRITE_KEYS = ("pattern", "format", "enum", "const")


def strict_strings(schema: Any) -> Any:
    """`schema` with every length-bounded string rewritten as a pattern that excludes control characters."""
    if isinstance(schema, list):
        return [strict_strings(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_strings(value) for key, value in schema.items()}
    bounded = any(key in out for key in _LENGTH_KEYS) and not any(key in out for key in _NO_REWRITE_KEYS)
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
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()

    def _compile(self, params: SamplingParams) -> xgr.CompiledGrammar:
        # Not sort_keys: property order is meaningful (xgrammar emits properties in schema order).
        key = json.dumps(params.json_schema) if params.json_schema is not None else "<json_object>"
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
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
            # xgrammar's message starts with a C++ source location; keep only what the user can act on.
            reason = str(e).strip().splitlines()[0].split(": ", 1)[-1]
            raise GrammarError(f"response_format json_schema cannot be compiled: {reason}") from e
        self._cache[key] = compiled
        if len(self._cache) > GRAMMAR_CACHE_SIZE:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, params: SamplingParams) -> xgr.GrammarMatcher | None:
        """A fresh matcher for one row, or None when the row is unconstrained."""
        if not params.constrained:
            return None
        return xgr.GrammarMatcher(self._compile(params))

    def mask_logits(self, logits: torch.Tensor, matchers: list[xgr.GrammarMatcher | None]) -> None:
        """Set the logits of grammar-forbidden tokens to -inf, in place, for rows that have a matcher.

        logits: (B, V) float32 on the CPU; matchers: one per row (None = leave the row alone).
        """
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
        if not rows:
            return
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)  # (B, ceil(V/32)) int32
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)
