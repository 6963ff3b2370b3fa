"""Checks on a response_format JSON schema before anything compiles it: bounded size and nesting, and a
value must exist. Plain Python (no torch, no xgrammar), so the HTTP edge refuses a bad schema with its 400
in microseconds without importing the decoding stack.

    check_schema({"type": "string", "maxLength": 20})   # GrammarError if refused (limits, admits no value)

What is checked and why: `constrained.py`'s docstring.
"""

from __future__ import annotations

from typing import Any

# Limits that keep one schema's compile around a second of one CPU at worst (measured on a 2-core box:
# a 1000-character bound ~0.4 s, two of them ~0.8 s, 20 strings of 100 ~0.4 s, 190 nested arrays ~0.5 s).
MAX_SCHEMA_DEPTH = 64  # nested JSON objects/arrays in the schema text (one object property is two)
MAX_SCHEMA_NODES = 1000  # JSON objects/arrays in the schema text
# xgrammar's cost grows with the square of an object's optional properties (400: ~0.5 s, 990: ~10 s).
MAX_OPTIONAL_PROPERTIES = 128  # properties not in `required`, per object
MAX_STRING_BOUND = 1000  # one string's minLength / maxLength
MAX_TOTAL_STRING_BOUND = 2000  # the sum of every string's largest bound
LENGTH_KEYS = ("minLength", "maxLength")


class GrammarError(ValueError):
    """A response_format schema that is refused or that xgrammar cannot compile; the message says why."""


# --------------------------------------------------------------------------------------------------
# Checks before compiling
# --------------------------------------------------------------------------------------------------


def check_schema(schema: Any) -> None:
    """Raise GrammarError if `schema` is over a compile limit or admits no JSON value at all."""
    check_limits(schema)
    reason = _empty_reason(schema)
    if reason is not None:
        raise GrammarError(f"response_format json_schema admits no value: {reason}; fix or remove that part")


def check_limits(schema: Any) -> None:
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
            bounds = [node[k] for k in LENGTH_KEYS if isinstance(node.get(k), int | float)]
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
    while stack:  # every $ref string in the schema (bounded by check_limits)
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
