"""The mistakes a new user makes first, tried the way they would make them.

Each must end in an `error:` line saying what is wrong, a `hint:` line saying what to do next,
the exit code of its kind (2 usage, 1 failed operation), no traceback, and nothing written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cli_runner import run
from helpers import qv_adapter

from loractl import save_adapter

if TYPE_CHECKING:
    from fakehub import FakeHub

pytest_plugins = ("fakehub",)

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "fixtures" / "tiny-llama"
QV = ROOT / "fixtures" / "adapters" / "tiny-qv"
DATA = ROOT / "fixtures" / "data" / "train.jsonl"


def assert_told(err: str, code: int, expected_code: int, what: str, next_step: str) -> None:
    """`error: …what…` first, `hint: …next_step…` last, the exit code, and no traceback."""
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert lines[0].startswith("error: ") and what in lines[0], err
    assert lines[-1].startswith("hint: ") and next_step in lines[-1], err
    assert "Traceback" not in err


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch directory as the working directory, so relative outputs land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# (arguments, exit code, what the error says, what the hint says); {work} is the scratch directory
MISTAKES = {
    "a misspelt path": (["inspect", "fixtures/adapters/tiny-qvv"], 2, "does not exist", "check the path"),
    "a model checkpoint where an adapter goes": (["inspect", str(BASE)], 1, "not a LoRA adapter", "loractl extract"),
    "a file in no adapter format": (
        ["inspect", str(ROOT / "fixtures" / "data" / "train.jsonl")], 1, "not a LoRA adapter", "--from",
    ),
    "a misspelt --from": (["inspect", str(QV), "--from", "kohyaa"], 2, "unknown format 'kohyaa'", "kohya"),
    "GGUF without --base": (["convert", str(QV), "-o", "a.gguf", "--to", "gguf"], 2, "base model", "--base"),
    "an unknown --to format": (
        ["convert", str(QV), "-o", "out", "--to", "safetensors"], 2, "unknown target format", "peft",
    ),
    "extract without --rank or --energy": (["extract", str(BASE), str(BASE), "-o", "x"], 2, "--rank", "--energy 0.9"),
    "a zero rank": (["resize", str(QV), "-o", "small", "--rank", "0"], 2, "at least 1", "rank ≥ 1"),
    "a negative rank": (["extract", str(BASE), str(BASE), "-o", "x", "--rank", "-4"], 2, "at least 1", "--rank 16"),
    "a zero scale": (["rescale", str(QV), "-o", "x", "--scale", "0"], 2, "non-zero", "--to-scale 0.5"),
    "an output that exists": (["convert", str(QV), "-o", "{work}", "--to", "kohya"], 2, "already exists", "--force"),
    "the output over the input": (["convert", str(QV), "-o", str(QV), "--to", "kohya"], 2, "overwrite the input", ""),
    "a misspelt command": (["inspct", str(QV)], 2, "no such command 'inspct'. Did you mean 'inspect'?", "loractl --help"),
    "a misspelt option": (["validate", str(QV), "--formt"], 2, "Did you mean one of: '--format'", "validate --help"),
    "a missing -o": (["convert", str(QV), "--to", "peft"], 2, "missing option '-o'", "'loractl convert --help'"),
    "a number that is not one": (
        ["train", "--base", str(BASE), "--data", "d.jsonl", "-o", "x", "--lr", "abc"], 2, "'abc' is not a valid float",
        "'loractl train --help'",
    ),
    "a misspelt choice": (["validate", str(QV), "--target", "llama.cpp"], 2, "'llama.cpp' is not one of", "--help"),
    "resize without a rule": (
        ["resize", str(QV), "-o", "small"], 2, "--rank, --energy, --fro, --ratio, --cumulative, --budget", "--budget 4MB",
    ),
    "both --steps and --epochs": (
        ["train", "--base", str(BASE), "--data", str(DATA), "-o", "x", "--steps", "2", "--epochs", "1"], 2, "not both",
        "--steps N",
    ),
    "training on a missing file": (
        ["train", "--base", str(BASE), "--data", "data.jsonl", "-o", "x"], 2, "does not exist", "check the path",
    ),
}  # fmt: skip


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistake_is_explained(mistake: str, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, expected_code, what, next_step = MISTAKES[mistake]
    before = sorted(work.iterdir())
    code, out, err = run(capsys, *(a.format(work=work) for a in args))
    assert_told(err, code, expected_code, what, next_step)
    assert out == ""
    assert sorted(work.iterdir()) == before  # nothing written, not even a temporary


def test_click_usage_errors_are_two_lines(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """click's own errors in loractl's shape: no usage block, no `Try …` line, no capitalised `Error:`."""
    code, out, err = run(capsys, "convert", str(QV), "--to", "peft")
    assert (code, out) == (2, "")
    assert err.splitlines() == ["error: missing option '-o' / '--output'", "hint: see 'loractl convert --help'"]


def test_output_exists_names_force_as_the_caller_passes_it(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The Python API's error says `force=True`; the same error from the CLI says `--force`."""
    from loractl import convert
    from loractl.errors import OutputExistsError

    with pytest.raises(OutputExistsError) as raised:
        convert(QV, work, to="kohya")
    assert raised.value.hint is not None and "force=True" in raised.value.hint and "--force" not in str(raised.value)
    code, _, err = run(capsys, "convert", str(QV), "-o", str(work), "--to", "kohya")
    assert_told(err, code, 2, "already exists", "--force")
    assert "force=True" not in err


# every command, with each input path missing in turn: exit 2, one error naming the path, a hint
MISSING_INPUTS = {
    "inspect": ["inspect", "{missing}"],
    "validate": ["validate", str(QV), "{missing}"],
    "validate --base": ["validate", str(QV), "--base", "{missing}"],
    "merge BASE": ["merge", "{missing}", str(QV), "-o", "out"],
    "merge ADAPTER": ["merge", str(BASE), "{missing}", "-o", "out"],
    "extract BASE": ["extract", "{missing}", str(BASE), "-o", "out", "--rank", "2"],
    "extract FINETUNED": ["extract", str(BASE), "{missing}", "-o", "out", "--rank", "2"],
    "diff": ["diff", str(QV), "{missing}"],
    "eval BASE": ["eval", "{missing}", str(QV), "--data", str(DATA)],
    "eval ADAPTER": ["eval", str(BASE), "{missing}", "--data", str(DATA)],
    "eval --data": ["eval", str(BASE), str(QV), "--data", "{missing}"],
    "combine": ["combine", str(QV), "{missing}", "-o", "out"],
    "resize": ["resize", "{missing}", "-o", "out", "--rank", "1"],
    "rescale": ["rescale", "{missing}", "-o", "out", "--to-scale", "0.5"],
    "convert": ["convert", "{missing}", "-o", "out", "--to", "peft"],
    "convert --base": ["convert", str(QV), "-o", "out", "--to", "kohya", "--base", "{missing}"],
    "train --base": ["train", "--base", "{missing}", "--data", str(DATA), "-o", "out"],
    "train --data": ["train", "--base", str(BASE), "--data", "{missing}", "-o", "out"],
    "train --eval-data": ["train", "--base", str(BASE), "--data", str(DATA), "--eval-data", "{missing}", "-o", "out"],
    "push": ["push", "{missing}", "file://{work}/registry/alice/lora", "--create"],
}


@pytest.mark.parametrize("case", MISSING_INPUTS)
def test_a_missing_input_is_a_usage_error_everywhere(case: str, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(missing="no-such-file", work=work) for a in MISSING_INPUTS[case]]
    code, out, err = run(capsys, *args)
    lines = [line.strip() for line in (out + err).strip().splitlines()]  # validate reports on stdout
    assert code == 2, err
    assert any(line.startswith(("error: ", "error [")) and "no-such-file" in line for line in lines), err
    assert lines[-1].startswith("hint: ") and "Traceback" not in err, err
    assert not (work / "out").exists()


def test_an_invalid_adapter_config_has_a_hint(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "bad").mkdir()
    (work / "bad" / "adapter_model.safetensors").write_bytes((QV / "adapter_model.safetensors").read_bytes())
    for config, what in [
        ('{"peft_type": "LORA", "r": "x"}', "r must be a positive integer"),
        ("[1,", "not valid JSON"),
    ]:
        (work / "bad" / "adapter_config.json").write_text(config)
        code, _, err = run(capsys, "inspect", "bad")
        assert_told(err, code, 1, what, "fix")


def test_a_forced_single_file_format_on_a_directory_lists_its_files(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (work / "two").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (work / "two" / name).write_bytes((QV / "adapter_model.safetensors").read_bytes())
    code, _, err = run(capsys, "inspect", "two", "--from", "diffusers")
    assert_told(err, code, 1, "no pytorch_lora_weights.safetensors", "give the weights file itself")
    assert "a.safetensors, b.safetensors" in err
    code, _, err = run(capsys, "inspect", str(QV), "--from", "torchtune")
    assert_told(err, code, 1, "no adapter_model.pt", "adapter_config.json, adapter_model.safetensors")


def test_every_error_has_a_hint(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An error raised without a hint gets its kind's next step (the command's --help for a usage error)."""
    from loractl.errors import FormatError, LoractlError, UsageError

    assert FormatError("x").hint and LoractlError("x", hint="mine").hint == "mine"
    code, _, err = run(capsys, "train", "--base", str(BASE), "--data", str(DATA), "-o", "x", "--dropout", "1")
    assert_told(err, code, 2, "dropout 1.0 must be in [0, 1)", "see 'loractl train --help'")
    code, _, err = run(capsys, "train", "--base", str(BASE), "--data", str(DATA), "-o", "x", "--nproc", "0")
    assert_told(err, code, 2, "'--nproc': 0 is not in the range", "--help")  # it trained one process before
    assert UsageError("x").hint is None  # the library has no --help to point at: the CLI adds it


def test_eval_without_transformers_names_eval(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    code, _, err = run(capsys, "eval", str(BASE), "--data", str(DATA))
    assert_told(err, code, 2, "eval needs transformers", "pip install")
    assert "training" not in err


def test_inspect_exits_1_on_error_findings(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PEFT keys read as torchtune printed 24 `error [unknown-key]` lines and exited 0; now no LoRA module is read."""
    code, out, err = run(
        capsys, "inspect", str(QV / "adapter_model.safetensors"), "--from", "torchtune", "--alpha", "16"
    )
    assert code == 1 and "no LoRA module read as torchtune" in err, out + err
    assert run(capsys, "inspect", str(QV))[0] == 0


def test_rank_too_high_for_extract(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "extract", str(BASE), str(BASE), "-o", "x", "--rank", "100")
    assert_told(err, code, 2, "--rank 100 exceeds", "--energy")
    assert not (work / "x").exists()


def test_pickle_needs_allow_pickle(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from safetensors.torch import load_file

    (work / "old").mkdir()
    (work / "old" / "adapter_config.json").write_text((QV / "adapter_config.json").read_text())
    torch.save(load_file(QV / "adapter_model.safetensors"), work / "old" / "adapter_model.bin")
    code, _, err = run(capsys, "inspect", "old", "--stats")
    assert_told(err, code, 1, "pickle", "--allow-pickle")
    code, out, err = run(capsys, "inspect", "old", "--stats", "--allow-pickle")
    assert code == 0 and "peft" in out, err


def test_merge_with_an_adapter_for_another_base(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_adapter(qv_adapter(hidden=16), work / "other", format="peft")  # q/v of a 16-wide model
    code, _, err = run(capsys, "merge", str(BASE), "other", "-o", "merged")
    assert_told(err, code, 1, "problems; nothing was written", "made for this base")
    assert "(16, 16), but base 'model.layers.0.self_attn.q_proj.weight' is (64, 64)" in err  # every mismatch listed
    assert not (work / "merged").exists()


def test_push_to_the_hub_without_a_token(
    hub: FakeHub, work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run(capsys, "push", str(QV), "alice/my-lora", "--create", "--endpoint", hub.endpoint)
    assert_told(err, code, 1, "", "HF_TOKEN")


def test_file_registry_mistakes(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = f"file://{work}/registry/me/lora"
    code, _, err = run(capsys, "push", str(QV), repo)
    assert_told(err, code, 1, "not found", "--create")
    assert run(capsys, "push", str(QV), repo, "--create", "--tag", "v1")[0] == 0
    code, _, err = run(capsys, "pull", f"{repo}@v2", "-o", "pulled")
    assert_told(err, code, 1, "'v2'", "loractl versions")
    assert not (work / "pulled").exists()


def test_a_real_process_prints_no_traceback(work: Path) -> None:
    """The installed entry point, not just `main`: one error line, one hint, exit 2."""
    out = subprocess.run(
        [sys.executable, "-m", "loractl", "inspect", "missing-adapter"], capture_output=True, text=True, cwd=work
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["error: missing-adapter does not exist", "hint: check the path"]
