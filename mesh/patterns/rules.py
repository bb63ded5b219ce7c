"""Policy rules: the file they live in (``MESH_POLICY_FILE``), read and checked once at start.

    [[rule]]
    name = "big-refunds-need-approval"
    on = "tool"                      # tool | message | output
    when = 'tool == "refund" && args.amount_eur > 100'
    decision = "approve"             # allow | deny | approve | redact
    reason = "refunds over 100 EUR need a person's approval"

Conditions are CEL (https://cel.dev), through ``common-expression-language``: the Rust CEL
interpreter (cel-rust) behind Python bindings. Chosen over ``cel-python`` because it parses
and runs a condition in microseconds (a rule runs on every tool call, outgoing message and
model reply, so this is a hot path), ships type stubs (mypy strict), and is one compiled
wheel instead of a pure-Python interpreter on a parser generator.

Everything is checked here, before the agent takes a message: the TOML, each rule's keys and
values, its condition (parsed, and every name it uses known for its ``on``), its regular
expression. A mistake raises `ConfigError` with the file, the line of the rule and the reason.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import cel

from mesh.wire.errors import ConfigError

On = Literal["tool", "message", "output"]
Decision = Literal["allow", "deny", "approve", "redact"]
REDACTED: Final = "[redacted]"

_COMMON: Final = ("agent", "sender", "conversation", "tenant", "received", "received_type")
# the names a condition may use, by what it looks at (docs/llm-and-tools.md, "Policies")
VARIABLES: Final[dict[str, frozenset[str]]] = {
    "tool": frozenset((*_COMMON, "tool", "args", "calls")),
    "message": frozenset((*_COMMON, "type", "subject", "kind", "target", "body")),
    "output": frozenset((*_COMMON, "text", "tool_calls", "model", "provider")),
}
DECISIONS: Final[dict[str, frozenset[str]]] = {
    "tool": frozenset(("allow", "deny", "approve", "redact")),
    "message": frozenset(("allow", "deny", "redact")),  # a message cannot wait for a person
    "output": frozenset(("allow", "deny", "redact")),
}
_TYPE_NAMES: Final = frozenset(
    ("int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type")
)
_FUNCTIONS: Final = frozenset(
    (
        "size",
        "contains",
        "startsWith",
        "endsWith",
        "matches",
        "int",
        "uint",
        "double",
        "string",
        "bytes",
        "bool",
        "dyn",
        "type",
        "timestamp",
        "duration",
        "max",
        "min",
        "find_all",  # the mesh's own (mesh.patterns.policy)
        "lower",
    )
)
_KEYS: Final = frozenset(("name", "on", "when", "decision", "reason", "report_only", "fields", "pattern"))
_MACRO = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_RULE_HEADER = re.compile(r"^\s*\[\[\s*rule\s*\]\]")


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule, compiled. `fields` are dotted paths in what is checked (a message's body, a
    tool call's arguments); `pattern` a regular expression whose matches are redacted."""

    name: str
    on: On
    when: cel.Program
    decision: Decision
    reason: str = ""
    report_only: bool = False
    fields: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None
    where: str = ""  # file:line, for messages


@dataclass(frozen=True, slots=True)
class Rules:
    """The rules of a policy file, in file order, by what they look at."""

    source: str = ""
    rules: tuple[Rule, ...] = ()
    report_only: bool = False  # the whole file only reports (MESH_POLICY_REPORT_ONLY or `report_only`)
    by_on: dict[str, tuple[Rule, ...]] = field(default_factory=dict)

    def of(self, on: On) -> tuple[Rule, ...]:
        return self.by_on.get(on, ())


def load(path: Path, report_only: bool = False) -> Rules:
    """Read and check the policy file at `path`; `ConfigError` says where and why it is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"MESH_POLICY_FILE={path}: cannot be read: {exc.strerror or exc}") from None
    return parse(text, str(path), report_only)


def parse(text: str, source: str = "<policy>", report_only: bool = False) -> Rules:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    extra = sorted(set(doc) - {"rule", "policy"})
    if extra:
        raise ConfigError(f"{source}: unknown table(s) {extra}: a policy file has [policy] and [[rule]] only")
    head = doc.get("policy", {})
    if not isinstance(head, dict) or set(head) - {"report_only"}:
        raise ConfigError(f"{source}: [policy] takes one key, report_only = true|false")
    raw = doc.get("rule", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: write each rule as a [[rule]] table")
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if _RULE_HEADER.match(line)]
    rules: list[Rule] = []
    for index, item in enumerate(raw):
        line = lines[index] if index < len(lines) else 0
        rules.append(_rule(item, index, f"{source}:{line}" if line else source, text, line))
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise ConfigError(f"{rule.where}: a second rule named {rule.name!r}: rule names are unique")
        seen.add(rule.name)
    everything = report_only or bool(head.get("report_only", False))
    by_on = {on: tuple(r for r in rules if r.on == on) for on in VARIABLES}
    return Rules(source, tuple(rules), everything, by_on)


def _rule(item: Any, index: int, where: str, text: str, line: int) -> Rule:
    label = f"rule {index + 1}"

    def fail(reason: str, key: str = "") -> ConfigError:
        at = _key_line(text, line, key) if key and line else 0
        place = f"{where.rsplit(':', 1)[0]}:{at}" if at else where
        return ConfigError(f"{place}: {label}: {reason}")

    if not isinstance(item, dict):
        raise fail("is not a table")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise fail('has no name: give it name = "..." (it is what the trace and audit record show)')
    label = f"rule {index + 1} ({name!r})"
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        hints = [
            f"{k} (did you mean {c[0]}?)" if (c := difflib.get_close_matches(k, _KEYS, 1)) else k
            for k in unknown
        ]
        raise fail(f"unknown key(s) {', '.join(hints)}; a rule has {', '.join(sorted(_KEYS))}", unknown[0])
    on = item.get("on")
    if on not in VARIABLES:
        raise fail(f"on = {on!r}: it must be one of {', '.join(VARIABLES)}", "on")
    decision = item.get("decision")
    if decision not in DECISIONS[on]:
        raise fail(
            f"decision = {decision!r}: on {on!r} it must be one of {', '.join(sorted(DECISIONS[on]))}",
            "decision",
        )
    when = item.get("when")
    if not isinstance(when, str) or not when.strip():
        raise fail("has no condition: give it when = '<CEL expression>'", "when")
    program = _compile(when, on, lambda reason: fail(reason, "when"))
    reason = item.get("reason", "")
    report = item.get("report_only", False)
    if not isinstance(reason, str) or not isinstance(report, bool):
        raise fail("reason is text and report_only is true or false")
    fields, pattern = item.get("fields", []), item.get("pattern")
    if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
        raise fail('fields is a list of dotted paths, e.g. ["card.number", "note"]', "fields")
    if on == "output" and fields:
        raise fail("an output rule redacts text spans: give a pattern, not fields", "fields")
    compiled = None
    if pattern is not None:
        try:
            compiled = re.compile(str(pattern))
        except re.error as exc:
            raise fail(f"pattern {pattern!r} is not a regular expression: {exc}", "pattern") from None
    if decision == "redact" and not fields and compiled is None:
        raise fail("a redact rule needs fields = [...] or pattern = '...' (or both)")
    if decision != "redact" and (fields or compiled is not None):
        raise fail("fields and pattern belong to redact rules", "fields" if fields else "pattern")
    return Rule(name, on, program, decision, reason, report, tuple(fields), compiled, where)


def _compile(source: str, on: str, fail: Any) -> cel.Program:
    try:
        program = cel.compile(source)
    except ValueError as exc:
        raise fail(f"the condition does not parse: {exc}") from None
    known = VARIABLES[on] | _TYPE_NAMES | set(_MACRO.findall(source))
    for name in program.variables():
        if name not in known:
            close = difflib.get_close_matches(name, VARIABLES[on], 1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            names = ", ".join(sorted(VARIABLES[on]))
            raise fail(f"unknown name {name!r}{hint}; on {on!r} a condition may use {names}")
    for fn in program.functions():
        if fn[0] not in "_@!-" and fn not in _FUNCTIONS:
            close = difflib.get_close_matches(fn, _FUNCTIONS, 1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise fail(f"unknown function {fn!r}{hint}")
    return program


def _key_line(text: str, start: int, key: str) -> int:
    """The line of `key` in the rule table starting at line `start` (0 if not found)."""
    lines = text.splitlines()
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number in range(start, len(lines)):  # from the line after the rule's header
        if _RULE_HEADER.match(lines[number]) or lines[number].lstrip().startswith("["):
            break
        if pattern.match(lines[number]):
            return number + 1
    return 0
