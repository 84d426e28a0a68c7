"""rank_pattern / alpha_pattern keys: PEFT's answers on real keys, bounded time on hostile ones."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from helpers import run_cli

from loractl.errors import FormatError
from loractl.formats.peft.pattern_keys import MAX_KEYS, compile_keys

MODULES = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.down_proj",
    "model.layers.0.self_attn.v_proj", "transformer.h.3.attn.c_attn", "xq_proj", "lm_head",
]  # fmt: skip
KEYS = [
    ("v_proj",), (r"model\.layers\.0\.self_attn\.q_proj", "q_proj"), ("^model.layers.0.self_attn.q_proj",),
    (r"layers\.\d+\.self_attn\.q_proj",), (".*_proj",), ("[qv]_proj",), ("q_proj$",), (r"\d+\.mlp\..*",),
    ("layers.1.self_attn.q_proj", "q_proj"), ("proj",), ("self_attn.q_proj", r"layers\.1\..*"), (r"h\.\d\.attn\..+",),
    ("c_attn", "h.3.attn.c_attn"), (r"model\.layers\.1[0-9]?\.\w+\.\w+_proj",), ("lm_head", ".*"),
]  # fmt: skip
BACKTRACKING = ["(a|a)*(b|b)*(.*)*$!", "(.*.*)*x", "((q|q)+)+z", "(\\w+\\w+)+\\.!", "(.+)+(.+)+(.+)+$x"]


def peft_first(keys: tuple[str, ...], module: str) -> int | None:
    """PEFT's own resolution (`peft.utils.other.get_pattern_key`), as an index."""
    return next((i for i, k in enumerate(keys) if re.match(rf"(.*\.)?({k})$", module)), None)


@pytest.mark.parametrize("keys", KEYS, ids=lambda k: "|".join(k))
def test_keys_resolve_as_peft_resolves_them(keys: tuple[str, ...]) -> None:
    compiled = compile_keys(keys)
    assert [compiled.first(m) for m in MODULES] == [peft_first(keys, m) for m in MODULES]


@pytest.mark.parametrize("key", BACKTRACKING)
def test_backtracking_keys_are_refused_by_name(key: str) -> None:
    with pytest.raises(FormatError, match="regular-expression syntax loractl does not run"):
        compile_keys((key,))


def test_wildcard_keys_run_in_linear_time() -> None:
    """Twelve `.*` against a 1,000-character path: PEFT's expression would try about 10^27 splits."""
    start = time.perf_counter()
    assert compile_keys((".*" * 12 + "!",)).first("a." * 500) is None
    assert time.perf_counter() - start < 1


def test_key_count_is_capped() -> None:
    with pytest.raises(FormatError, match="over the cap"):
        compile_keys(tuple(f"m{i}" for i in range(MAX_KEYS + 1)))


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_backtracking_key_in_a_config_is_one_error_line(tmp_path: Path, fixtures_dir: Path, field: str) -> None:
    adapter = tmp_path / "a"
    shutil.copytree(fixtures_dir / "adapters" / "tiny-qv", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[field] = {"q_proj": 4, BACKTRACKING[0]: 8}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    code, _, err = run_cli("inspect", adapter)
    assert time.perf_counter() - start < 5
    assert code == 1 and err.count("error:") == 1 and f"{field}: key '(a|a)*" in err and "hint:" in err, err
