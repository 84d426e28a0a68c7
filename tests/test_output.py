"""The CLI's output helpers: progress bars on a terminal, silence when piped."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from loractl.cli import _output


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_yields_every_item_with_and_without_a_terminal(
    monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    sink = io.StringIO()
    monkeypatch.setattr(_output.stderr, "_console", Console(file=sink, force_terminal=terminal, width=80))
    assert list(_output.progress(iter(range(5)), 5, "working")) == [0, 1, 2, 3, 4]
    assert ("working" in sink.getvalue()) == terminal


def test_consoles_are_created_lazily() -> None:
    lazy = _output.LazyConsole(to_stderr=True)
    assert lazy._console is None
    assert lazy.get() is lazy.get() and lazy.is_terminal in (True, False)


def test_a_commands_ctx_exit_code_reaches_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without standalone mode click returns `ctx.exit(code)`; `main` must still exit with it (train --nproc)."""
    import click

    from loractl.cli import cli, main

    @click.command("boom")
    @click.pass_context
    def boom(ctx: click.Context) -> None:
        ctx.exit(3)

    from loractl.cli import COMMANDS

    monkeypatch.setattr(cli, "get_command", lambda ctx, name: boom if name == "boom" else None)
    monkeypatch.setitem(COMMANDS, "boom", "boom_cmd")  # a known name: unknown ones are usage errors
    with pytest.raises(SystemExit) as e:
        main(["boom"])
    assert e.value.code == 3
