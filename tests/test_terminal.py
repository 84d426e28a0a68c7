"""What a person reads: tables at 80 and 160 columns, lineage lines, sizes, grouped findings, encodings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import random_module

import loractl
from loractl.adapter import Adapter, AdapterMeta
from loractl.cli import _output
from loractl.cli._text import relative

ROOT = Path(__file__).resolve().parent.parent
TINY_LLAMA = ROOT / "fixtures" / "tiny-llama"
TINY_QV = ROOT / "fixtures" / "adapters" / "tiny-qv"
WIDTHS = (80, 160)
LONG = "d" * 120  # a directory name wider than a line: where the files are must not decide the layout


@pytest.fixture
def columns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test's console is made afresh, so COLUMNS (set per test) is the width rich renders at."""
    monkeypatch.setattr(_output.stdout, "_console", None)
    monkeypatch.setattr(_output.stderr, "_console", None)
    yield
    _output.stdout._console = None
    _output.stderr._console = None


def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, width: int, *argv: str | Path):
    from cli_runner import run as run_main

    monkeypatch.setenv("COLUMNS", str(width))
    _output.stdout._console = None
    _output.stderr._console = None
    return run_main(capsys, *map(str, argv))


def table_column(text: str, header: str) -> list[str]:
    """The cells of column `header` in the rich table that has it, folded lines joined back together."""
    lines = text.splitlines()

    def heads(line: str) -> list[str]:
        return [h.strip() for h in line.strip("┃").split("┃")] if line.startswith("┃") else []

    start = next(i for i, line in enumerate(lines) if header in heads(line))
    col = heads(lines[start]).index(header)
    cells: list[str] = []
    for line in lines[start + 2 :]:
        if not line.startswith("│"):
            break
        parts = [p.strip() for p in line.strip("│").split("│")]
        if cells and sum(bool(p) for p in parts) <= 1:
            cells[-1] += parts[col]  # a continuation: a name folded after a dot
        else:
            cells.append(parts[col])
    return cells


def table_width(text: str) -> int:
    """The widest table line (plain sentences are left to the terminal to wrap, like any text)."""
    return max(len(line) for line in text.splitlines() if line[:1] in "┏┃┡│└")


def sd_adapter(path: Path) -> Adapter:
    """A Stable-Diffusion-like UNet adapter: twelve attention blocks that differ in alpha, `to_out.0` included."""
    modules = {}
    for side, blocks in (("down_blocks", range(3)), ("up_blocks", range(1, 4))):
        for b in blocks:
            for a in range(2):
                for j, proj in enumerate(("to_q", "to_k", "to_v", "to_out.0")):
                    name = f"unet.{side}.{b}.attentions.{a}.transformer_blocks.0.attn1.{proj}"
                    alpha = float(1 + b * 2 + a + (10 if side == "up_blocks" else 0))
                    modules[name] = random_module(32, 32, 4, alpha=alpha, seed=100 * b + 10 * a + j)
    adapter = Adapter(modules=modules, meta=AdapterMeta(base_model="sd15"))
    loractl.save_adapter(adapter, path)
    return adapter


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect_never_cuts_what_tells_rows_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None, width: int
) -> None:
    adapter = sd_adapter(tmp_path / "sd")
    code, out, _ = run(capsys, monkeypatch, width, "inspect", tmp_path / "sd", "--stats")
    assert code == 0
    assert table_width(out) <= width
    patterns = table_column(out, "modules")
    expected = [p.pattern for p in loractl.inspect_adapter(tmp_path / "sd").patterns]
    assert patterns == expected and len(set(patterns)) == 24  # to_{k,q,v} and to_out.0 of twelve blocks, each whole
    assert not any("#" in p or "…" in p for p in patterns)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in patterns
    names = table_column(out, "module")
    assert sorted(names) == sorted(adapter.modules) and len(names) == len(adapter.modules)


def test_rows_sort_numbers_by_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None
) -> None:
    modules = {f"transformer.h.{i}.attn.c_attn": random_module(48, 16, 2 + i % 2, seed=i) for i in range(12)}
    loractl.save_adapter(Adapter(modules=modules, meta=AdapterMeta(base_model="gpt2")), tmp_path / "g")
    code, out, _ = run(capsys, monkeypatch, 80, "inspect", tmp_path / "g", "--stats")
    assert code == 0
    names = table_column(out, "module")
    assert names == [f"transformer.h.{i}.attn.c_attn" for i in range(12)]  # h.2 before h.10


@pytest.mark.parametrize("width", WIDTHS)
def test_merge_names_adapters_by_path_and_sizes_in_human_units(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None, width: int
) -> None:
    code, out, _ = run(capsys, monkeypatch, width, "merge", TINY_LLAMA, TINY_QV, "-o", tmp_path / "m")
    assert code == 0, out
    assert table_width(out) <= width
    if width <= 80:  # the names need the room: the columns that repeat one value move to the caption
        assert "every row: adapter tiny-qv, role lora, weight 1, rank 8" in out
        lines = out.splitlines()
        assert all(any(m in line for line in lines) for m in loractl.load_adapter(TINY_QV).modules)  # one line each
    else:
        assert set(table_column(out, "adapter")) == {"tiny-qv"}
    modules = table_column(out, "module")
    assert sorted(modules) == sorted(loractl.load_adapter(TINY_QV).modules)
    from loractl.ops.merge_plan import plan_merge

    size = plan_merge(TINY_LLAMA, [TINY_QV]).total_bytes
    assert 1e5 < size < 1e6 and f"tensors (4 merge, 0 replace, 0 untie, 17 copy), {size / 1000:.3g} KB" in out


def test_swapped_merge_arguments_are_named(tmp_path: Path) -> None:
    from helpers import run_cli

    code, _, err = run_cli("merge", TINY_QV, TINY_LLAMA, "-o", tmp_path / "m")
    assert code != 0 and "did you swap BASE and ADAPTER?" in err and "hint:" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("width", WIDTHS)
def test_extract_table_keeps_whole_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None, width: int
) -> None:
    from helpers import run_cli

    assert run_cli("merge", TINY_LLAMA, TINY_QV, "-o", tmp_path / "ft")[0] == 0
    code, out, _ = run(capsys, monkeypatch, width, "extract", TINY_LLAMA, tmp_path / "ft", "-o", tmp_path / "x",
                       "--rank", "4", "--targets", "q_proj", "--targets", "v_proj")  # fmt: skip
    assert code == 0, out
    assert table_width(out) <= width
    assert table_column(out, "module") == sorted(loractl.load_adapter(TINY_QV).modules)


def test_rescale_shows_old_and_new_scale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None
) -> None:
    code, out, _ = run(capsys, monkeypatch, 80, "rescale", TINY_QV, "-o", tmp_path / "half", "--scale", "0.5")
    assert code == 0
    old = {m.scale for m in loractl.load_adapter(TINY_QV).modules.values()}
    assert len(old) == 1
    (s,) = old
    assert table_column(out, "scale") == [f"{s:.6g} → {s / 2:.6g}"]
    assert "rank in" not in out  # not a resize table
    code, doc, _ = run(capsys, monkeypatch, 80, "rescale", TINY_QV, "-o", tmp_path / "h2", "--scale", "0.5", "--json")
    assert code == 0 and {tuple(x["scale"]) for x in json.loads(doc)["scales"]} == {(s, s / 2)}


def test_lineage_is_one_readable_line_per_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None
) -> None:
    from helpers import run_cli

    assert run_cli("rescale", TINY_QV, "-o", tmp_path / "a", "--scale", "0.5")[0] == 0
    assert run_cli("resize", tmp_path / "a", "-o", tmp_path / "b", "--rank", "2")[0] == 0
    code, out, _ = run(capsys, monkeypatch, 80, "inspect", tmp_path / "b")
    lines = [line for line in out.splitlines() if line.startswith("lineage:")]
    parent = loractl.load_adapter(TINY_QV).content_hash()
    assert len(lines) == 2 and " rescale scale=0.5 from " + parent[:19] in lines[0]
    assert " resize rank=2 from sha256:" in lines[1] and "| max rel. error " in lines[1]
    assert not any(word in out for word in ("None", "False", "{'", "from -"))
    code, doc_text, _ = run(capsys, monkeypatch, 80, "inspect", tmp_path / "b", "--json")
    assert code == 0
    lineage = json.loads(doc_text)["lineage"]
    assert lineage[0]["params"] == {"scale": 0.5} and "modules" in lineage[1]["metrics"]  # the whole record


def test_validate_groups_repeats_under_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None
) -> None:
    modules = {f"transformer.h.{i}.attn.c_attn": random_module(48, 16, 2, seed=i) for i in range(12)}
    modules |= {f"transformer.h.{i}.mlp.c_fc": random_module(64, 16, 2, seed=50 + i) for i in range(12)}
    loractl.save_adapter(Adapter(modules=modules, meta=AdapterMeta(base_model="gpt2")), tmp_path / "g")
    code, out, _ = run(capsys, monkeypatch, 80, "validate", tmp_path / "g", "--base", TINY_LLAMA)
    assert code == 1
    lines = out.splitlines()
    assert "24 of 24 modules have no tensor in the base: the adapter was made for another architecture (gpt2)" in out
    assert len(lines) <= 5 and sum("[base-missing]" in line for line in lines) == 1
    assert "24 times in transformer.h.{0..11}.attn.c_attn; transformer.h.{0..11}.mlp.c_fc" in out
    code, doc, _ = run(capsys, monkeypatch, 80, "validate", tmp_path / "g", "--base", TINY_LLAMA, "--json")
    report = json.loads(doc)["reports"][0]
    assert len(report["findings"]) == 24 and len(report["summary"]) == 1  # --json keeps every finding


def test_validate_keeps_the_pickle_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None
) -> None:
    from safetensors.torch import load_file

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_bytes((TINY_QV / "adapter_config.json").read_bytes())
    torch.save(load_file(TINY_QV / "adapter_model.safetensors"), tmp_path / "p" / "adapter_model.bin")
    for style in ("text", "github", "json"):
        code, out, _ = run(capsys, monkeypatch, 80, "validate", tmp_path / "p", "--format", style)
        assert code == 1 and "--allow-pickle" in out, style


def test_narrow_stdout_encoding_never_crashes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    args = [sys.executable, "-m", "loractl", "rescale", str(TINY_QV), "-o", str(tmp_path / "r"), "--scale", "0.5"]
    done = subprocess.run(args, env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    text = done.stdout.decode("ascii")  # every byte is ASCII
    assert " -> " in text and "wrote" in text
    inspect = subprocess.run([sys.executable, "-m", "loractl", "inspect", str(tmp_path / "r"), "--stats"],
                             env=env, capture_output=True, timeout=120)  # fmt: skip
    assert inspect.returncode == 0 and "||dW||_F" in inspect.stdout.decode("ascii")
    for output in (text, inspect.stdout.decode("ascii")):
        tables = re.findall(r"(?:^\|.*\n)+", output, re.M)  # each table's rows, table by table
        assert tables and all(len({len(row) for row in t.splitlines()}) == 1 for t in tables)  # still aligned


@pytest.mark.usefixtures("one_thread")
def test_train_without_a_terminal_logs_a_loss_line_every_log_every_steps(tmp_path: Path) -> None:
    from helpers import run_cli

    pytest.importorskip("transformers")
    data = ROOT / "fixtures" / "data" / "train.jsonl"
    code, _, err = run_cli("train", "--base", TINY_LLAMA, "--data", data, "-o", tmp_path / "o", "--steps", "6",
                           "--log-every", "2", "--lr", "1e-2")  # fmt: skip
    assert code == 0, err
    steps = [line.split(":")[0] for line in err.splitlines() if line.startswith("step ") and " loss " in line]
    assert steps == ["step 2/6", "step 4/6", "step 6/6"]
    assert f"metrics: {tmp_path / 'o.train' / 'metrics.jsonl'}" in err
    assert (tmp_path / "o.train" / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ("inspect", TINY_QV, "--json"),
        ("validate", TINY_QV, "--json"),
        ("merge", TINY_LLAMA, TINY_QV, "--dry-run", "--json"),
        ("extract", TINY_LLAMA, TINY_LLAMA, "-o", "{tmp}/x", "--rank", "2", "--dry-run", "--json"),
        ("rescale", TINY_QV, "-o", "{tmp}/r", "--scale", "2", "--json"),
        ("convert", TINY_QV, "-o", "{tmp}/c.safetensors", "--to", "kohya", "--json"),
    ],
    ids=lambda argv: argv[0],
)
def test_every_json_document_has_a_schema(tmp_path: Path, argv: tuple[str | Path, ...]) -> None:
    from helpers import run_cli

    code, out, err = run_cli(*(str(a).format(tmp=tmp_path) for a in argv))
    assert code == 0, err
    assert json.loads(out)["schema"] == f"loractl/{argv[0]}/1"


def test_lost_entries_are_objects(tmp_path: Path) -> None:
    from helpers import run_cli

    dora = ROOT / "fixtures" / "adapters" / "tiny-dora"
    code, out, err = run_cli("convert", dora, "-o", tmp_path / "l.pt", "--to", "loralib", "--allow-loss", "--json")
    assert code == 0, err
    (lost,) = json.loads(out)["lost"]
    what = {k: lost[k] for k in ("what", "count", "modules")}
    assert what == {"what": "DoRA magnitudes", "count": 4, "modules": sorted(loractl.load_adapter(dora).modules)}
    assert {"update_change", "weight_change"} <= lost.keys()


def sd_pair(tmp_path: Path) -> tuple[Path, Path, Adapter]:
    """Two versions of the SD-like adapter under a 120-character directory, every module changed by its own amount."""
    (tmp_path / LONG).mkdir()
    a = sd_adapter(tmp_path / LONG / "a")
    moved = {n: replace(m, B=m.B * (1 + i / 10)) for i, (n, m) in enumerate(sorted(a.modules.items()))}
    loractl.save_adapter(Adapter(modules=moved, meta=a.meta), tmp_path / LONG / "b")
    return tmp_path / LONG / "a", tmp_path / LONG / "b", a


def test_diff_shows_every_module_name_whole_and_distinct_at_80_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None
) -> None:
    a, b, adapter = sd_pair(tmp_path)
    code, out, _ = run(capsys, monkeypatch, 80, "diff", a, b, "--top", "48")
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80  # the long paths too
    names = table_column(out, "module")
    assert sorted(names) == sorted(adapter.modules)  # each whole, none twice
    assert out.splitlines()[:2] == ["A …/a", "B …/b"]  # each path's end, where the whole is wider than a line


def test_no_output_line_ends_in_spaces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None
) -> None:
    from helpers import run_cli

    a, b, _ = sd_pair(tmp_path)
    assert run_cli("merge", TINY_LLAMA, TINY_QV, "-o", tmp_path / "ft")[0] == 0
    for argv in (
        ("inspect", a, "--stats"),
        ("validate", a),
        ("diff", a, b),
        ("rescale", a, "-o", tmp_path / "r", "--scale", "0.5"),
        ("resize", a, "-o", tmp_path / "s", "--rank", "2"),
        ("convert", a, "-o", tmp_path / "c", "--to", "peft", "--rank", "2"),
        ("merge", TINY_LLAMA, TINY_QV, "-o", tmp_path / "m"),
        ("merge", TINY_LLAMA, TINY_QV, "--dry-run"),
        ("extract", TINY_LLAMA, tmp_path / "ft", "-o", tmp_path / "x", "--rank", "2"),
        ("extract", TINY_LLAMA, tmp_path / "ft", "-o", tmp_path / "x2", "--rank", "2", "--dry-run"),
    ):
        code, out, err = run(capsys, monkeypatch, 80, *argv)
        assert code in (0, 1), (argv, err)
        trailing = [line for line in (out + err).splitlines() if line != line.rstrip()]
        assert not trailing, (argv[0], trailing)


@pytest.mark.parametrize(
    ("x", "text"),
    [(0.0, "0"), (0.616, "0.616"), (0.62, "0.620"), (4.1, "4.10"), (6.24e-07, "6.24e-07"), (1e-3, "0.00100"),
     (123.4, "123"), (2500.0, "2.50e+03"), (None, "n/a"), (float("inf"), "inf")],
)  # fmt: skip
def test_one_style_for_relative_figures(x: float | None, text: str) -> None:
    assert relative(x) == text


def test_every_command_prints_relative_errors_in_that_style(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None
) -> None:
    from helpers import run_cli

    assert run_cli("merge", TINY_LLAMA, TINY_QV, "-o", tmp_path / "ft")[0] == 0
    extract = ("extract", TINY_LLAMA, tmp_path / "ft", "--rank", "2")
    code, doc, _ = run(capsys, monkeypatch, 80, *extract, "-o", tmp_path / "x1", "--json")
    modules = sorted(json.loads(doc)["modules"], key=lambda m: m["module"])
    code, out, _ = run(capsys, monkeypatch, 80, *extract, "-o", tmp_path / "x2")
    assert code == 0 and table_column(out, "rel error") == [relative(m["rel_error"]) for m in modules]
    resize = ("resize", TINY_QV, "--rank", "1")
    code, doc, _ = run(capsys, monkeypatch, 80, *resize, "-o", tmp_path / "r1", "--json")
    modules = sorted(json.loads(doc)["modules"], key=lambda m: m["module"])
    code, out, _ = run(capsys, monkeypatch, 80, *resize, "-o", tmp_path / "r2")
    assert code == 0 and table_column(out, "rel. error") == [relative(m["rel_error"]) for m in modules]


def test_inspect_of_a_pulled_adapter_shows_the_hash_pull_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None
) -> None:
    repo = f"file://{tmp_path}/registry/alice/lora"
    assert run(capsys, monkeypatch, 80, "push", TINY_QV, repo, "--create", "--tag", "v1")[0] == 0
    assert run(capsys, monkeypatch, 80, "pull", f"{repo}@v1", "-o", tmp_path / "out")[0] == 0
    code, out, _ = run(capsys, monkeypatch, 80, "inspect", tmp_path / "out")
    assert code == 0 and "not recorded" not in out
    verified = loractl.load_adapter(TINY_QV).content_hash()[:19]
    assert f"content hash  {verified} (verified by pull)" in out


def test_versions_shows_whole_hashes_and_fits_80_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: None
) -> None:
    repo = f"file://{tmp_path}/{LONG}/alice/lora"
    message = "retrained model.layers.0.self_attn.q_proj and model.layers.1.self_attn.v_proj on the new data"
    assert run(capsys, monkeypatch, 80, "push", TINY_QV, repo, "--create", "--tag", "v1", "-m", message)[0] == 0
    code, out, _ = run(capsys, monkeypatch, 80, "versions", repo)
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 80
    pushed = loractl.load_adapter(TINY_QV).content_hash()[:19]
    assert table_column(out, "content hash")[0] == pushed  # whole, not squeezed to "sha256:b734e968…"
    assert "".join(table_column(out, "message")[0].split()) == "".join(message.split())  # folded, nothing cut
