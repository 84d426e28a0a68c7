"""Crash safety: merge, extract, convert and pull killed with SIGKILL leave no corrupt output.

Each run is the real CLI (`loractl.cli.main`) in a child process forked from a warm
forkserver (torch already imported, so a run takes a fraction of a second). Kills land
at random times during a run and, deterministically, at the critical moments: mid-file
(the Nth tensor write), before the fsync, before the final rename, and between the two
renames that swap an old directory out under `--force`. After every kill:

* the final path holds nothing, the old content (under `--force`), or a complete output;
* everything else beside it is a hidden `.loractl-tmp-` temporary;
* the next run succeeds and leaves no temporary behind (stale ones are cleaned).

A file-size limit (RLIMIT_FSIZE) stands in for a full disk: the run fails with a clear
error and exit 1, and leaves nothing at the final path.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FIXTURES

from loractl.io.atomic import TMP_MARKER

BASE = FIXTURES / "tiny-llama"
ADAPTER = FIXTURES / "adapters" / "tiny-qv"
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "loractl.cli", "loractl.formats", "loractl.ops.merge", "loractl.remote"])
# (dotted function, call number): the child SIGKILLs itself just before that call.
HOOKS = [
    ("loractl.io.safetensors_writer.StreamWriter.write", 2),
    ("os.fsync", 1),
    ("loractl.io.atomic.claim", 1),  # the final rename, by whichever call (renameat2 without --force)
    ("os.replace", 2),  # with --force over an old directory: between moving it aside and moving the new in
]


def _kill_before(target: str, nth: int | str) -> None:
    """Patch `target` so that its `nth` call kills this process first; a str `nth` kills right after
    the call whose first argument is that path (e.g. the rename that moves the old output aside)."""
    import importlib

    module_name, _, attr = target.rpartition(".")
    try:
        owner: object = importlib.import_module(module_name)
    except ModuleNotFoundError:
        mod, _, cls = module_name.rpartition(".")
        owner = getattr(importlib.import_module(mod), cls)
    original = getattr(owner, attr)
    calls = [0]

    def wrapper(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if isinstance(nth, str) and args and str(args[0]) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, attr, wrapper)


def _child(argv: list[str], stderr: str, hook: tuple[str, int | str] | None, fsize: int | None) -> None:
    """The forked run: optional kill hook and file-size limit, then the real entry point."""
    import resource

    fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    if hook:
        _kill_before(*hook)
    if fsize is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    from loractl.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    os._exit(code)


@dataclass
class Run:
    code: int | None
    seconds: float
    stderr: str


def run_cli(
    argv: list[str],
    tmp: Path,
    *,
    kill_after: float | None = None,
    hook: tuple[str, int | str] | None = None,
    fsize: int | None = None,
) -> Run:
    err = tmp / f"stderr-{time.monotonic_ns()}"
    p = _CTX.Process(target=_child, args=(argv, str(err), hook, fsize))
    start = time.monotonic()
    p.start()
    if kill_after is not None:
        p.join(kill_after)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
    p.join(120)
    assert not p.is_alive(), "the run hung"
    text = err.read_text() if err.exists() else ""
    return Run(p.exitcode, time.monotonic() - start, text)


@dataclass(frozen=True)
class Scenario:
    """A writing command: argv without `-o`, and a check that an output is complete."""

    name: str
    argv: Callable[[Path], list[str]]
    output_name: str
    complete: Callable[[Path], bool]


def _adapter_ok(path: Path) -> bool:
    from loractl.validation import validate_adapter

    return not validate_adapter(path).failed()


def _checkpoint_ok(path: Path) -> bool:
    from loractl.io.checkpoint import Checkpoint

    with Checkpoint(BASE) as base, Checkpoint(path) as out:
        return sorted(base.names) == sorted(out.names) and (path / "config.json").is_file()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fine-tuned checkpoint (base + tiny-qv merged) for extract, and a file:// registry for pull."""
    from loractl.ops.merge import merge
    from loractl.remote import push

    root = tmp_path_factory.mktemp("inputs")
    merge(BASE, [ADAPTER], root / "finetuned")
    registry = f"file://{root}/registry/alice/lora"
    push(ADAPTER, registry, create=True)
    return {"finetuned": root / "finetuned", "registry": Path(registry.removeprefix("file://"))}


def _scenarios(inputs: dict[str, Path]) -> dict[str, Scenario]:
    return {
        "merge": Scenario(
            "merge", lambda out: ["merge", str(BASE), str(ADAPTER), "-o", str(out)], "merged", _checkpoint_ok
        ),
        "extract": Scenario(
            "extract",
            lambda out: ["extract", str(BASE), str(inputs["finetuned"]), "-o", str(out), "--rank", "4"],
            "extracted",
            _adapter_ok,
        ),
        "convert": Scenario(
            "convert",
            lambda out: ["convert", str(ADAPTER), "-o", str(out), "--to", "kohya"],
            "kohya.safetensors",
            _adapter_ok,
        ),
        "pull": Scenario(
            "pull", lambda out: ["pull", f"file://{inputs['registry']}", "-o", str(out)], "pulled", _adapter_ok
        ),
    }


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            h.update(p.read_bytes())
    return h.hexdigest()


def _plant_old(out: Path, as_dir: bool) -> str:
    if as_dir:
        out.mkdir()
        (out / "OLD").write_text("the previous output")
    else:
        out.write_bytes(b"the previous output")
    return _digest(out)


def _assert_after_kill(scenario: Scenario, out: Path, old: str | None) -> None:
    """Nothing, the old content, or a complete output at `out`; only hidden temporaries beside it."""
    if out.exists():
        assert _digest(out) == old or scenario.complete(out), f"{scenario.name}: a partial output at {out}"
    else:
        assert not out.is_symlink()
    strays = [p.name for p in out.parent.iterdir() if p.name != out.name]
    assert all(n.startswith(".") and TMP_MARKER in n for n in strays), strays


def _assert_next_run_succeeds(scenario: Scenario, out: Path, tmp: Path) -> None:
    run = run_cli([*scenario.argv(out), "--force"], tmp)
    assert run.code == 0, run.stderr
    assert scenario.complete(out)
    assert os.listdir(out.parent) == [out.name], "stale temporaries were left behind"


def _kill_times(rng: random.Random, duration: float, n: int) -> list[float]:
    return sorted(rng.uniform(0.05, 1.1) * duration for _ in range(n))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["merge", "extract", "convert", "pull"])
def test_kills_at_critical_points_leave_no_partial_output(name: str, inputs: dict[str, Path], tmp_path: Path) -> None:
    scenario = _scenarios(inputs)[name]
    as_dir = not scenario.output_name.endswith(".safetensors")
    killed = 0
    for i, (hook, force) in enumerate([(h, f) for h in HOOKS for f in (False, True)]):
        work = tmp_path / f"{i}"
        work.mkdir()
        out = work / scenario.output_name
        old = _plant_old(out, as_dir) if force else None
        run = run_cli(scenario.argv(out) + (["--force"] if force else []), tmp_path, hook=hook)
        killed += run.code == -signal.SIGKILL
        _assert_after_kill(scenario, out, old)
        _assert_next_run_succeeds(scenario, out, tmp_path)
    assert killed >= len(HOOKS), f"only {killed} runs were killed: the hooks miss the write path"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["merge", "extract", "convert", "pull"])
def test_kills_at_random_times_leave_no_partial_output(name: str, inputs: dict[str, Path], tmp_path: Path) -> None:
    scenario = _scenarios(inputs)[name]
    probe = run_cli(scenario.argv(tmp_path / "probe" / scenario.output_name), tmp_path)
    assert probe.code == 0, probe.stderr
    rng = random.Random(f"{name}-kills")
    for i, when in enumerate(_kill_times(rng, probe.seconds, 4)):
        out = tmp_path / f"{i}" / scenario.output_name
        out.parent.mkdir()
        old = _plant_old(out, not out.suffix) if i % 2 else None
        run_cli(scenario.argv(out) + (["--force"] if old else []), tmp_path, kill_after=when)
        _assert_after_kill(scenario, out, old)
        _assert_next_run_succeeds(scenario, out, tmp_path)


def test_a_kill_before_the_final_rename_leaves_nothing(inputs: dict[str, Path], tmp_path: Path) -> None:
    """The quick default check (the full matrix of kill points and commands is marked slow)."""
    scenario = _scenarios(inputs)["convert"]
    out = tmp_path / "work" / scenario.output_name
    out.parent.mkdir()
    run = run_cli(scenario.argv(out), tmp_path, hook=("loractl.io.atomic.claim", 1))
    assert run.code == -signal.SIGKILL and not out.exists()
    assert [n for n in os.listdir(out.parent) if TMP_MARKER in n], "the kill came before anything was written"
    _assert_after_kill(scenario, out, None)
    _assert_next_run_succeeds(scenario, out, tmp_path)


def test_a_kill_between_the_swap_renames_keeps_the_old_directory(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Killed after moving the old output aside: the next run puts it back before anything else."""
    scenario = _scenarios(inputs)["convert"]
    out = tmp_path / "work" / "peft-out"
    out.parent.mkdir()
    old = _plant_old(out, as_dir=True)
    argv = ["convert", str(ADAPTER), "-o", str(out), "--to", "peft", "--force"]
    run = run_cli(argv, tmp_path, hook=("os.replace", str(out)))
    assert run.code == -signal.SIGKILL and not out.exists()
    retry = run_cli(argv[:-1], tmp_path)  # without --force: refused, and the old content is back
    assert retry.code == 2 and "already exists" in retry.stderr
    assert _digest(out) == old and os.listdir(out) == ["OLD"]
    assert os.listdir(out.parent) == [out.name]
    _assert_next_run_succeeds(scenario, out, tmp_path)


@pytest.mark.parametrize(
    "name",
    ["merge", "convert", pytest.param("extract", marks=pytest.mark.slow), pytest.param("pull", marks=pytest.mark.slow)],
)
def test_a_full_disk_is_a_clear_error_and_leaves_nothing(name: str, inputs: dict[str, Path], tmp_path: Path) -> None:
    scenario = _scenarios(inputs)[name]
    out = tmp_path / "work" / scenario.output_name
    out.parent.mkdir()
    run = run_cli(scenario.argv(out), tmp_path, fsize=2048)
    assert run.code == 1, run.stderr
    assert "error:" in run.stderr and "no room" in run.stderr and "hint:" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert os.listdir(out.parent) == []
    _assert_next_run_succeeds(scenario, out, tmp_path)
