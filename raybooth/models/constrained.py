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

# Distinct schemas kept compiled per engine: a batch job usually has one or a few.
GRAMMAR_CACHE_SIZE = 64
ANY_OBJECT = '{"type": "object"}'
# Limits that keep one schema's compile around a second of one CPU at worst (measured on a 2-core box:
# a 1000-character bound ~0.4 s, two of them ~0.8 s, 20 strings of 100 ~0.4 s, 190 nested arrays ~0.5 s).
MAX_SCHEMA_DEPTH = 64  # nested JSON objects/arrays in the schema text (one object property is two)
MAX_SCHEMA_NODES = 1000  # JSON objects/arrays in the schema text
# xgrammar's cost grows with the square of an object's optional properties (400: ~0.5 s, 990: ~10 s).
MAX_OPTIONAL_PROPERTIES = 128  # properties not in `required`, per object
MAX_STRING_BOUND = 1000  # one string's minLength / maxLength
MAX_TOTAL_STRING_BOUND = 2000  # the sum of every string's largest bound


class GrammarError(ValueError):
    """A response_format schema that is refused or that xgrammar cannot compile; the message says why."""


# --------------------------------------------------------------------------------------------------
# Checks before compiling
# --------------------------------------------------------------------------------------------------


def check_schema(schema: Any) -> None:
    """Raise GrammarError if `schema` is over a compile limit or admits no JSON value at all."""
    _check_limits(schema)
    reason = _empty_reason(schema)
    if reason is not None:
        raise GrammarError(f"response_format json_schema admits no value: {reason}; fix or remove that part")


def _check_limits(schema: Any) -> None:
    # Iterative walk: a 190-deep schema must not reach Python's recursion limit before it is refused.
    stack: list[tuple[Any, int]] = [(schema, 1)]
    nodes = total = 0
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict | list):
            continue
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(
                f"response_format json_schema nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it"
            )
        if nodes > MAX_SCHEMA_NODES:
            raise GrammarError(
                f"response_format json_schema has more than {MAX_SCHEMA_NODES} objects and arrays; shrink it"
            )
        children = node.values() if isinstance(node, dict) else node
        if isinstance(node, dict):
            bounds = [node[k] for k in _LENGTH_KEYS if isinstance(node.get(k), int | float)]
            if bounds and max(bounds) > MAX_STRING_BOUND:
                raise GrammarError(
                    f"response_format json_schema minLength/maxLength may be at most {MAX_STRING_BOUND}, "
                    f"got {max(bounds)}"
                )
            properties, required = node.get("properties"), node.get("required")
            if isinstance(properties, dict):
                optional = set(properties) - set(required if isinstance(required, list) else [])
                if len(optional) > MAX_OPTIONAL_PROPERTIES:
                    raise GrammarError(
                        f"an object in response_format json_schema has {len(optional)} optional properties, "
                        f"more than {MAX_OPTIONAL_PROPERTIES}; list some in 'required' or split the object"
                    )
            low, high = node.get("minLength"), node.get("maxLength")
            if len(bounds) == 2 and low > high:  # else the pattern rewrite fails with regex parser text
                raise GrammarError(
                    f"response_format json_schema minLength {low} is greater than maxLength {high}"
                )
            total += int(max(bounds, default=0))
            if total > MAX_TOTAL_STRING_BOUND:
                raise GrammarError(
                    "response_format json_schema minLength/maxLength bounds add up to more than "
                    f"{MAX_TOTAL_STRING_BOUND}; lower them"
                )
        stack.extend((child, depth + 1) for child in children)


_ANNOTATIONS = {"title", "description", "$comment", "examples", "default", "$schema", "$id"}


def _is_anything(schema: Any) -> bool:
    return schema is True or (isinstance(schema, dict) and set(schema) <= _ANNOTATIONS)


def _resolve(root: Any, ref: str) -> Any:
    """The local target of `ref` ("#", "#/$defs/a"), or None when it is not one (xgrammar reports it)."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _empty_reason(schema: Any) -> str | None:
    """Why `schema` admits no value, or None when some value validates.

    A least fixpoint over `$ref`s: a ref counts as satisfiable only once its target has been shown to be,
    so refs that only lead to each other (no base case) stay empty."""
    refs: set[str] = set()
    stack = [schema]
    while stack:  # every $ref string in the schema (bounded by _check_limits)
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    good = {ref for ref in refs if _resolve(schema, ref) is None}
    changed = True
    while changed:
        changed = False
        for ref in sorted(refs - good):
            if _why_empty(_resolve(schema, ref), schema, good) is None:
                good.add(ref)
                changed = True
    return _why_empty(schema, schema, good)


def _why_empty(node: Any, root: Any, good: set[str]) -> str | None:
    if node is False:
        return "a 'false' schema"
    if not isinstance(node, dict):
        return None
    ref = node.get("$ref")
    if isinstance(ref, str) and ref not in good:
        return f"'$ref': {ref!r} refers back to itself with no case that ends (no base case)"
    if node.get("enum") == []:
        return "'enum' is empty"
    if "not" in node and _is_anything(node["not"]):
        return "'not' excludes every value"
    if node.get("type") == []:
        return "'type' is an empty list"
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list):
            reasons = [_why_empty(option, root, good) for option in options]
            if all(r is not None for r in reasons):
                return f"no option of '{key}' admits a value" + (f" ({reasons[0]})" if reasons else "")
    for part in node.get("allOf", []) if isinstance(node.get("allOf"), list) else []:
        reason = _why_empty(part, root, good)
        if reason is not None:
            return reason
    properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    required = node.get("required") if isinstance(node.get("required"), list) else []
    for name in required:
        sub = properties.get(name, node.get("additionalProperties", True)) if isinstance(name, str) else True
        reason = _why_empty(sub, root, good)
        if reason is not None:
            return f"required property {name!r}: {reason}"
    min_items = node.get("minItems", 0) if isinstance(node.get("minItems", 0), int) else 0
    prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else []
    needed = prefix[:min_items] + ([node.get("items", True)] if min_items > len(prefix) else [])
    for sub in needed:
        reason = _why_empty(sub, root, good)
        if reason is not None:
            return f"array items (minItems {min_items}): {reason}"
    return None


# xgrammar errors read "[09:31:40] /project/cpp/file.cc:4944: message"; its own failed assertions
# ("Check failed: (grammar_->...) is false") are no use to a user.
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
        # xgrammar's own cache off: with it, a pattern grammar compiled after an any-JSON one (json_object,
        # `not`) fails a C++ check (xgrammar 0.2.8); the LRU below caches compiled grammars instead.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        # Callers may compile ahead of a batch from other threads (VLMEngine.check); compiles run unlocked.
        self._lock = threading.Lock()

    def _compile(self, params: SamplingParams) -> xgr.CompiledGrammar:
        if params.json_schema is not None:
            # The limits first: json.dumps below recurses, and a very deep schema would raise RecursionError.
            _check_limits(params.json_schema)
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
