"""PEFT's `adapter_config.json` semantics: per-module rank and alpha, and how to write them back.

Pattern resolution mirrors PEFT (`utils/other.py: get_pattern_key`): keys are tried in
insertion order, and the first with `re.match(rf"(.*\\.)?({key})$", module)` wins; `pattern_keys`
matches them without running that backtracking expression.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from ...errors import FormatError
from ...info import scale_from_alpha
from ...io.values import finite_number, positive_int, shown
from .pattern_keys import compile_keys

# Heads PEFT adds to modules_to_save by task type, although the config says null.
IMPLICIT_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def check_config(config: dict[str, Any], path: Path) -> None:
    """Refuse values PEFT's LoRA semantics cannot use (NaN alphas, ranks < 1, bad patterns), naming the field."""
    positive_int(config.get("r", 8), "r", path)
    finite_number(config.get("lora_alpha", 8), "lora_alpha", path)
    for key, check in (("rank_pattern", positive_int), ("alpha_pattern", finite_number)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise FormatError(f"{key} must map module patterns to values", path=path)
        try:
            compile_keys(tuple(patterns))
        except FormatError as e:
            raise FormatError(f"{key}: {e.message}", hint=e.hint, path=path) from None
        for pattern, value in patterns.items():
            check(value, f"{key}[{shown(pattern)}]", path)
    for key in ("modules_to_save", "base_model_name_or_path", "revision", "task_type"):
        value = config.get(key)
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value) if key == "modules_to_save" else True
        if value is not None and not (ok if key == "modules_to_save" else isinstance(value, str)):
            raise FormatError(f"{key} has the wrong type ({type(value).__name__})", path=path)


def pattern_value(patterns: dict[str, Any], module: str) -> Any | None:
    """The value of the first pattern matching `module`, as PEFT resolves rank/alpha patterns (`pattern_keys`)."""
    index = compile_keys(tuple(patterns)).first(module) if patterns else None
    return None if index is None else list(patterns.values())[index]


def module_alpha_rank(config: dict[str, Any], module: str) -> tuple[float, int]:
    """(alpha, r) PEFT uses for `module`."""
    r = pattern_value(config.get("rank_pattern") or {}, module)
    alpha = pattern_value(config.get("alpha_pattern") or {}, module)
    return (
        float(alpha if alpha is not None else config.get("lora_alpha", 8)),
        int(r if r is not None else config.get("r", 8)),
    )


def is_saved_module(config: dict[str, Any], tensor_name: str) -> bool:
    """Whether a full tensor is explained by modules_to_save (raw suffix match, as PEFT does)."""
    module = tensor_name.rsplit(".", 1)[0]
    names = list(config.get("modules_to_save") or []) + list(IMPLICIT_HEADS.get(str(config.get("task_type")), ()))
    return any(module.endswith(n) for n in names)


def exact_alpha(scale: float, rank: int, rslora: bool, written: float | None) -> float | None:
    """An alpha whose scale_from_alpha gives exactly `scale`, preferring the one written; None if none exists."""
    candidates = [written] if written is not None else []
    guess = scale * (math.sqrt(rank) if rslora else rank)
    candidates.append(guess)
    up = down = guess
    for _ in range(4):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    for alpha in candidates:
        if alpha is not None and scale_from_alpha(alpha, rank, rslora) == scale:
            return alpha
    return None


def most_common(values: list[Any], default: Any) -> Any:
    """The most frequent value (ties: the first seen), for the config's global r and lora_alpha."""
    return Counter(values).most_common(1)[0][0] if values else default


def json_number(x: float) -> float | int:
    """Integers as JSON ints (PEFT writes `lora_alpha: 16`), everything else as exact floats."""
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else x
