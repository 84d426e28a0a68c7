"""PEFT's `rank_pattern` / `alpha_pattern` keys, matched without backtracking.

PEFT gives a module the value of the first key (in insertion order) for which
`re.match(rf"(.*\\.)?({key})$", module)` holds. Keys come from files anyone can write, and a key
such as `(a|a)*(b|b)*$!` makes that expression backtrack for hours. Keys are matched here in time
linear in the module path, with PEFT's answers on the keys real configs hold:

- a plain key (characters, `\\`-escaped characters and dots; `^` first or `$` last allowed) names
  the module or a dotted suffix of it, as PEFT's and loractl's writers produce them, and is looked
  up in a dict. One difference, by design: its `.` matches a dot only, not any character;
- a key with single-character wildcards and quantifiers (`layers\\.\\d+\\.q_proj`, `.*_proj`,
  `[qk]_proj`) runs as a Thompson simulation: no backtracking;
- anything else (groups, alternation, counted repeats, lookarounds) is refused, naming the key.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ...errors import FormatError
from ...io.values import shown

MAX_KEYS = 100_000  # per pattern field: one key per module of a very large MoE model
MAX_KEY_CHARS = 1024  # longer than any module path
MAX_WILDCARD_KEYS = 64  # keys that need the simulation: real configs hold a handful
_PLAIN = re.compile(r"(?:\\[^0-9A-Za-z]|[^\\^$*+?()\[\]{}|])*")
_ITEM = re.compile(r"\\.|\[\^?\]?(?:\\.|[^\]\\])*\]|[^\\\[]")  # an escape, a class, or one character
_HINT = "write module paths or dotted suffixes of them (as PEFT's writers do); `\\d+`, `.*` and `[...]` also work"

Token = tuple["re.Pattern[str]", str]  # one character's matcher, and "1", "?" or "*"


@dataclass(frozen=True)
class PatternKeys:
    """Compiled keys: `first(module)` is the index of the first key matching `module`, or None."""

    suffixes: dict[str, int]  # plain key → its index (the first, if repeated)
    exact: dict[str, int]  # plain key anchored with `^`
    wildcards: tuple[tuple[int, bool, tuple[Token, ...]], ...]  # (index, anchored, tokens), in key order

    def first(self, module: str) -> int | None:
        starts = [0, *(i + 1 for i, c in enumerate(module) if c == ".")]
        found = [self.suffixes.get(module[s:]) for s in starts] + [self.exact.get(module)]
        best = min((i for i in found if i is not None), default=None)
        for index, anchored, tokens in self.wildcards:
            if best is not None and index > best:
                break
            if _simulate(tokens, module, [0] if anchored else starts):
                return index
        return best


@functools.lru_cache(maxsize=16)
def compile_keys(keys: tuple[str, ...]) -> PatternKeys:
    """Compile pattern keys in order; `FormatError` naming the first key loractl does not run (or a cap)."""
    if len(keys) > MAX_KEYS:
        raise FormatError(f"{len(keys)} keys, over the cap of {MAX_KEYS}")
    suffixes: dict[str, int] = {}
    exact: dict[str, int] = {}
    wildcards = []
    for index, key in enumerate(keys):
        if len(key) > MAX_KEY_CHARS:
            raise FormatError(f"key of {len(key)} characters, over the cap of {MAX_KEY_CHARS}")
        anchored = key.startswith("^")
        body = key[1:] if anchored else key
        body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
        if _PLAIN.fullmatch(body):
            (exact if anchored else suffixes).setdefault(re.sub(r"\\(.)", r"\1", body), index)
            continue
        tokens = _tokens(body)
        if tokens is None:
            raise FormatError(f"key {shown(key)} uses regular-expression syntax loractl does not run", hint=_HINT)
        wildcards.append((index, anchored, tuple(tokens)))
    if len(wildcards) > MAX_WILDCARD_KEYS:
        raise FormatError(f"{len(wildcards)} keys with wildcards, over the cap of {MAX_WILDCARD_KEYS}", hint=_HINT)
    return PatternKeys(suffixes, exact, tuple(wildcards))


def _tokens(body: str) -> list[Token] | None:
    """Single-character items, each with an optional `?`, `*` or `+` (a lazy `?` after it is ignored)."""
    out: list[Token] = []
    at = 0
    while at < len(body):
        item = _ITEM.match(body, at)
        if item is None or item.group() in tuple("(){}|^$*+?"):
            return None
        at = item.end()
        quantifier = body[at] if at < len(body) and body[at] in "?*+" else "1"
        at += quantifier != "1"
        at += quantifier != "1" and body[at : at + 1] == "?"
        if body[at : at + 1] in ("?", "*", "+", "{"):
            return None
        try:
            matcher = re.compile(item.group())
        except re.error:
            return None
        out += [(matcher, "1"), (matcher, "*")] if quantifier == "+" else [(matcher, quantifier)]
    return out


def _simulate(tokens: tuple[Token, ...], text: str, starts: list[int]) -> bool:
    """Whether `tokens` match `text` from one of `starts` to its end: every state advanced in step."""
    begin = set(starts)
    states: set[int] = set()
    for at in range(len(text) + 1):
        if at in begin:
            states = _closure(tokens, states | {0})
        if at == len(text):
            return len(tokens) in states
        char = text[at]
        moved = {
            s if tokens[s][1] == "*" else s + 1 for s in states if s < len(tokens) and tokens[s][0].fullmatch(char)
        }
        states = _closure(tokens, moved)
    return False


def _closure(tokens: tuple[Token, ...], states: set[int]) -> set[int]:
    """`states` plus every state reached by skipping optional (`?`, `*`) tokens."""
    out = set(states)
    for s in sorted(states):
        while s < len(tokens) and tokens[s][1] in "?*":
            s += 1
            out.add(s)
    return out
