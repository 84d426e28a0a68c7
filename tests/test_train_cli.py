"""`loractl train` through the CLI: the fixture job, config files, and clear errors before any step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import loractl
from loractl.cli import cli, main
from loractl.cli.train_cmd import parse_targets

pytest.importorskip("transformers")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BASE, DATA = str(FIXTURES / "tiny-llama"), str(FIXTURES / "data" / "train.jsonl")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fixture_job_writes_a_peft_adapter_with_lineage(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    args = ["train", "--base", BASE, "--data", DATA, "--eval-data", str(FIXTURES / "data" / "eval.jsonl"), "-o",
            str(out), "--steps", "6", "--lr", "1e-2", "--batch-size", "4", "--save-every", "3", "--json"]  # fmt: skip
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    doc = json.loads(run.stdout)
    assert doc["steps"] == 6 and doc["eval_loss"] is not None and doc["trainable"] == 3584
    adapter = loractl.load_adapter(out)
    assert adapter.content_hash() == doc["content_hash"] and set(adapter.modules) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    }
    entry = adapter.lineage[-1]
    assert entry["op"] == "train" and entry["params"]["rank"] == 8 and entry["metrics"]["steps"] == 6
    assert entry["metrics"]["data_sha256"].startswith("sha256:") and adapter.meta.base_fingerprint
    metrics = [json.loads(line) for line in (tmp_path / "adapter.train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 7))
    assert sorted(p.name for p in (tmp_path / "adapter.train" / "checkpoints").iterdir()) == [
        "step-000003",
        "step-000006",
    ]
    assert "trainable parameters: 3,584 of 110,400" in run.stderr


def test_resume_through_the_cli_gives_the_same_adapter(tmp_path: Path) -> None:
    common = ["--base", BASE, "--data", DATA, "--steps", "4", "--batch-size", "2", "--lr", "1e-2", "--json"]
    straight = CliRunner().invoke(cli, ["train", *common, "-o", str(tmp_path / "a")])
    first = CliRunner().invoke(cli, ["train", *common, "-o", str(tmp_path / "b"), "--save-every", "2"])
    assert straight.exit_code == 0 and first.exit_code == 0, first.output
    resumed = CliRunner().invoke(cli, ["train", *common, "-o", str(tmp_path / "b"), "--save-every", "2", "--resume",
                                       str(tmp_path / "b.train" / "checkpoints" / "step-000002")])  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["content_hash"] == json.loads(straight.stdout)["content_hash"]


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, checkpoints = tmp_path / "a", tmp_path / "a.train" / "checkpoints"
    common = ["train", "--base", BASE, "--data", DATA, "--steps", "2", "--batch-size", "2", "-o", str(out)]
    assert CliRunner().invoke(cli, [*common, "--save-every", "2"]).exit_code == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    again = CliRunner().invoke(cli, [*common, "--resume", str(checkpoints)])
    assert again.exit_code == 0, again.output  # was: the output rewritten, then a TypeError formatting no loss
    assert "the run was already finished" in again.stdout and "nothing was written" in again.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]
    doc = json.loads(CliRunner().invoke(cli, [*common, "--resume", str(checkpoints), "--json"]).stdout)
    assert doc["finished_before"] is True and doc["output"] is None and doc["steps"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*common[:5], "--steps", "1", "--batch-size", "2", "-o", str(out), "--resume", str(checkpoints)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "past the 1 steps of this run" in err and "hint: resume with --steps 2" in err


HOLD_THE_RUN_LOCK = """
import fcntl, os, sys, time
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
lock.write(f"{os.getpid()}\\n")
lock.flush()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_busy_output_stops_and_writes_nothing(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Two trains into one OUTPUT shared OUTPUT.train/: one metrics.jsonl, each other's checkpoints."""
    import subprocess
    import sys

    out, run_dir = tmp_path / "out", tmp_path / "out.train"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_RUN_LOCK, str(run_dir / "lock")], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    argv = ["train", "--base", BASE, "--data", DATA, "-o", str(out), "--steps", "2", "--batch-size", "2"]
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert f"error: {run_dir} is in use by another train run (pid {holder.pid})" in err, err
    assert sorted(p.name for p in run_dir.iterdir()) == ["lock"] and not out.exists()
    assert CliRunner().invoke(cli, argv).exit_code == 0  # the holder is gone: the kernel dropped its lock
    assert (run_dir / "metrics.jsonl").is_file() and out.is_dir()


def test_force_starts_the_run_directory_afresh(tmp_path: Path) -> None:
    out, run_dir = tmp_path / "out", tmp_path / "out.train"
    common = ["train", "--base", BASE, "--data", DATA, "-o", str(out), "--batch-size", "2", "--save-every", "1"]
    assert CliRunner().invoke(cli, [*common, "--steps", "2"]).exit_code == 0
    again = CliRunner().invoke(cli, [*common, "--steps", "1"])
    assert "already exists" in str(again.exception)
    assert CliRunner().invoke(cli, [*common, "--steps", "1", "--force"]).exit_code == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1]  # the earlier run's lines went with it
    assert (run_dir / "lock").is_file()


def test_config_file_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"rank": 2, "targets": ["o_proj"], "steps": 1, "lr": 0.5}))
    run = CliRunner().invoke(cli, ["train", "--base", BASE, "--data", DATA, "-o", str(tmp_path / "o"),
                                   "--config", str(config), "--lr", "1e-3", "--batch-size", "2"])  # fmt: skip
    assert run.exit_code == 0, run.output
    adapter = loractl.load_adapter(tmp_path / "o")
    assert {m.rank for m in adapter.modules.values()} == {2} and all(n.endswith("o_proj") for n in adapter.modules)
    assert adapter.lineage[-1]["params"]["lr"] == 1e-3


def test_parse_targets() -> None:
    assert parse_targets("q_proj,v_proj") == ("q_proj", "v_proj")
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"


def _lines(tmp_path: Path, text: str) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("empty", 2, "no training examples"),
        ("not-json", 1, "line 2 is not valid JSON"),
        ("no-match", 2, "target 'qq_proj' matches no linear layer"),
        ("no-config", 2, "has no config.json"),
        ("rank-0", 2, "rank must be positive"),
        ("existing", 2, "already exists"),
        ("absent-device", 2, "torch sees no CUDA device"),
    ],
)
def test_bad_input_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, code: int,
                                         message: str) -> None:  # fmt: skip
    out = tmp_path / "out"
    base, data, extra = BASE, DATA, []
    if case == "empty":
        data = _lines(tmp_path, "\n")
    elif case == "not-json":
        data = _lines(tmp_path, '{"text": "fine"}\n{"text": oops\n')
    elif case == "no-match":
        extra = ["--targets", "q_proj,qq_proj"]
    elif case == "no-config":
        (tmp_path / "empty-base").mkdir()
        base = str(tmp_path / "empty-base")
    elif case == "rank-0":
        extra = ["--rank", "0"]
    elif case == "absent-device":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra = ["--device", "cuda"]
    else:
        out.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--base", base, "--data", data, "-o", str(out), "--steps", "50", *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == code and message in err and "error:" in err, err
    assert not (tmp_path / "out.train").exists()  # nothing ran


@pytest.mark.slow
def test_nproc_2_matches_one_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    common = ["--base", BASE, "--data", DATA, "--steps", "3", "--lr", "1e-2", "--json"]
    two = subprocess.run([sys.executable, "-m", "loractl", "train", *common, "--batch-size", "2", "--nproc", "2",
                          "-o", str(tmp_path / "two")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = CliRunner().invoke(cli, ["train", *common, "--batch-size", "4", "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    a, b = loractl.load_adapter(tmp_path / "one"), loractl.load_adapter(tmp_path / "two")
    for name, m in a.modules.items():
        torch.testing.assert_close(b.modules[name].B, m.B, rtol=1e-4, atol=1e-6)


def test_nproc_relaunches_the_arguments_it_was_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`main(argv)` re-runs argv's train arguments under torchrun (not the process's sys.argv), without
    --nproc, with the exit code of torchrun; --debug reaches the processes."""
    from loractl.cli import _torchrun

    calls: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(_torchrun.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 3)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", "--base", BASE, "--data", DATA, "-o", str(tmp_path / "x"), "--nproc", "3", "--rank", "4",
            "--nproc=2"]  # fmt: skip
    for debug in ([], ["--debug"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*debug, *argv])
        assert exit_info.value.code == 3
    (plain, env), (_, debug_env) = calls
    assert plain[plain.index("--standalone") :] == ["--standalone", "--nproc-per-node=2", "-m", "loractl", "train",
           "--base", BASE, "--data", DATA, "-o", str(tmp_path / "x"), "--rank", "4"]  # fmt: skip
    assert "LORACTL_DEBUG" not in env or env["LORACTL_DEBUG"] == os.environ.get("LORACTL_DEBUG")
    assert debug_env["LORACTL_DEBUG"] == "1"
    assert not (tmp_path / "x").exists()


def test_a_failure_under_torchrun_is_one_error(tmp_path: Path) -> None:
    """--nproc 2: one error and its hint, the process's exit code; no torchrun banner, logs or traceback."""
    import subprocess
    import sys

    argv = ["train", "--base", BASE, "--data", DATA, "-o", str(tmp_path / "x"), "--nproc", "2", "--targets", "zzz"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LORACTL_DEBUG")}
    done = subprocess.run(
        [sys.executable, "-m", "loractl", *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0] == "error: target 'zzz' matches no linear layer", done.stderr
    assert lines[1].startswith("hint: linear layers in this model end in:")


def test_third_party_banners_show_only_with_debug() -> None:
    """bitsandbytes logs warnings (kernels it could not load) that are not loractl's to show."""
    import subprocess
    import sys

    code = (
        "import logging, sys; from loractl.cli import main\n"
        "try: main(sys.argv[1:])\n"
        "except SystemExit: pass\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('a bitsandbytes banner')\n"
    )
    for debug, shown in ((["--debug"], True), ([], False)):
        done = subprocess.run([sys.executable, "-c", code, *debug, "--version"], capture_output=True, text=True)
        assert ("a bitsandbytes banner" in done.stderr) == shown, done.stderr


DISK_FILLS_AFTER_THE_FIRST_CHECKPOINT = """
import resource, sys
from loractl.train import checkpoints
real = checkpoints.save
def save(directory, *a, **k):
    path = real(directory, *a, **k)
    if path is not None:  # the disk fills: the next state.pt cannot be written whole (EFBIG, as a quota)
        limit = (path / "state.pt").stat().st_size - 1
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return path
checkpoints.save = save
from loractl.cli import main
main(sys.argv[1:])
"""


def test_a_full_disk_while_checkpointing_names_the_checkpoint_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    """Issue 27 item 8: was `RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos`."""
    import subprocess
    import sys

    out = tmp_path / "adapter"
    argv = ["train", "--base", BASE, "--data", DATA, "-o", str(out), "--steps", "4", "--batch-size", "2",
            "--save-every", "2"]  # fmt: skip
    run = subprocess.run([sys.executable, "-c", DISK_FILLS_AFTER_THE_FIRST_CHECKPOINT, *argv], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(FIXTURES.parent)})  # fmt: skip
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    checkpoints = out.parent / "adapter.train" / "checkpoints"
    assert lines[-2].startswith("error: no room to write") and str(checkpoints / "step-000004") in lines[-2], lines
    assert lines[-1] == f"hint: free disk space, then continue the run with --resume {checkpoints / 'step-000002'}"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000002"]  # the last good one, and no temporary
    state = torch.load(checkpoints / "step-000002" / "state.pt", weights_only=True)
    assert state["step"] == 2 and loractl.load_adapter(checkpoints / "step-000002" / "adapter").modules
    assert not out.exists()


def test_round_3_options_reach_the_run(tmp_path: Path) -> None:
    """--dora, --train-modules, --add-tokens, a parquet --data with --data-columns, --report-to tensorboard."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("tensorboard")
    rows = [json.loads(line) for line in Path(DATA).read_text().splitlines() if line.strip()]
    datasets.Dataset.from_list([{"body": r["text"]} for r in rows]).to_parquet(str(tmp_path / "rows.parquet"))
    out = tmp_path / "adapter"
    args = ["train", "--base", BASE, "--data", str(tmp_path / "rows.parquet"), "--data-columns", "text=body",
            "-o", str(out), "--steps", "2", "--batch-size", "4", "--dora", "--train-modules", "lm_head",
            "--add-tokens", "<|x|>", "--report-to", "tensorboard", "--json"]  # fmt: skip
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] and config["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    assert (out / "tokenizer.json").is_file() and list((tmp_path / "adapter.train" / "tensorboard").iterdir())
    params = loractl.load_adapter(out).lineage[-1]["params"]
    assert params["data"]["columns"] == {"text": "body"} and params["add_tokens"] == ["<|x|>"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--report-to", "mlflow"], "--report-to mlflow is not one of"),
     (["--data-columns", "body"], "is not ROLE=COLUMN"),
     (["--train-modules", "nothing_here"], "--train-modules 'nothing_here' matches no module")],
)  # fmt: skip
def test_round_3_option_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--base", BASE, "--data", DATA, "-o", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
