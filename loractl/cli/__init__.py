"""The `loractl` command line: a lazy click group and the one place errors are rendered.

Command modules are imported only when their command runs (or `--help` lists them), and
none imports torch at module level, so `loractl --help` stays fast.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import signal
import sys
import traceback
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .._version import __version__
from ._torchrun import COMMAND_ARGS

if TYPE_CHECKING:
    from ..errors import LoractlError

# click ≥ 8.2 raises this for `loractl` alone, to print the help and exit 2 (older versions exit 0)
_HELP_ONLY = tuple(c for c in [getattr(click.exceptions, "NoArgsIsHelpError", None)] if c is not None)

# command name → module under loractl.cli exposing `command`
COMMANDS = {
    "inspect": "inspect_cmd",
    "validate": "validate_cmd",
    "merge": "merge_cmd",
    "extract": "extract_cmd",
    "diff": "diff_cmd",
    "eval": "eval_cmd",
    "combine": "combine_cmd",
    "resize": "resize_cmd",
    "rescale": "rescale_cmd",
    "convert": "convert_cmd",
    "train": "train_cmd",
    "push": "push_cmd",
    "pull": "pull_cmd",
    "versions": "versions_cmd",
    "tag": "tag_cmd",
}


class LazyGroup(click.Group):
    """Imports a command's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f".{COMMANDS[name]}", __name__)
        return module.command  # type: ignore[no-any-return]

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """click's, with its "did you mean" over the lazy commands (click suggests only registered ones).

        The command's own arguments, as given, are kept in `ctx.meta` (`train --nproc` re-runs them).
        """
        name = args[0]
        ctx.meta[COMMAND_ARGS] = list(args[1:])
        if name in COMMANDS or name.startswith("-") or ctx.resilient_parsing:
            return super().resolve_command(ctx, args)
        close = difflib.get_close_matches(name, COMMANDS)
        suggestion = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise click.UsageError(f"No such command {name!r}.{suggestion}", ctx)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loractl")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (or set LORACTL_DEBUG=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """loractl: LoRA adapters as versioned artifacts.

    \b
    Examples:
      loractl inspect fixtures/adapters/tiny-qv
      loractl validate fixtures/adapters/* --format github
    """
    ctx.obj = {"debug": debug or os.environ.get("LORACTL_DEBUG") == "1"}


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the CLI and turn `LoractlError`s into `error:`/`hint:` lines."""
    from ..errors import LoractlError
    from ..io.interrupt import LATE, sigint_recorded
    from ..io.interrupt import check as check_interrupt
    from ._output import tolerate_narrow_encodings

    tolerate_narrow_encodings()
    if not _debugging(argv if argv is not None else sys.argv[1:]):
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its notes on kernels it could not load
    # A file-size limit (ulimit -f) then fails the write with EFBIG, which `atomic_output` turns
    # into an error with a hint, instead of SIGXFSZ killing the process mid-write.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        # a Ctrl-C some library swallows still stops the command; one after its output is in place does not
        with sigint_recorded(ignore_when_done=argv is None):  # (io/interrupt.py)
            result = cli.main(args=argv, prog_name="loractl", standalone_mode=False)
            check_interrupt()  # one held until an import ended, or swallowed, that nothing checked yet
            if LATE.is_set():
                click.echo("note: Ctrl-C came after the output was complete; it is kept", err=True)
        if isinstance(result, int) and not isinstance(result, bool) and result:
            sys.exit(result)  # without standalone mode, click returns a command's ctx.exit(code)
        return result
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except _HELP_ONLY as e:  # `loractl` alone: the help, as click shows it
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        _fail(_click_error(e), argv)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        if argv is None:  # this process is the CLI: it ends here
            _end_interrupted()
        sys.exit(130)
    except LoractlError as e:
        _fail(e, argv)
    except OSError as e:
        from ..io.atomic import WRITE_ERRNOS, os_error

        if e.errno not in WRITE_ERRNOS:
            raise
        _fail(os_error(e), argv)  # a read-only, full or blocked path outside the atomic writers


def _click_error(e: click.ClickException) -> LoractlError:
    """click's own errors (an unknown command or option, a missing or bad value) in loractl's shape.

    click's message is kept (with its "did you mean"), in loractl's case; the hint points at the
    command's --help, whose usage and options click would have printed.
    """
    from ..errors import LoractlError

    message = e.format_message()
    error = LoractlError(message[:1].lower() + message[1:].removesuffix("."))
    ctx = e.ctx if isinstance(e, click.UsageError) else None
    error.hint = f"see '{ctx.command_path if ctx else 'loractl'} --help'"
    error.exit_code = e.exit_code
    return error


def _end_interrupted() -> NoReturn:
    """Exit 130 at once, without the interpreter's teardown. Once, after a Ctrl-C during `import torch` was held
    and raised, a C++ library's teardown aborted the process after "aborted" was printed ("terminate called
    without an active exception": SIGABRT, not 130). Nothing is left to do by then: `atomic_output` has removed
    the partial output while the KeyboardInterrupt unwound."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _fail(e: LoractlError, argv: list[str] | None) -> NoReturn:
    """Render one error as `error:` and `hint:` lines on stderr (the traceback only when debugging) and exit.

    Under torchrun only the first process of each machine says it: the others fail the same way.
    """
    args = argv if argv is not None else sys.argv[1:]
    if _debugging(args):
        traceback.print_exc()
    elif os.environ.get("LOCAL_RANK", "0") != "0":
        sys.exit(e.exit_code)
    from ._text import printable

    click.echo(f"error: {printable(_where(e) + e.message)}", err=True)
    click.echo(f"hint: {printable(e.cli_hint or e.hint or _next_step(e, args))}", err=True)
    sys.exit(e.exit_code)


def _where(e: LoractlError) -> str:
    """The error's path as the user named it (a reader may have been reading an output's temporary)."""
    from ..io.atomic import user_path

    return f"{user_path(e.path)}: " if e.path else ""


def _debugging(args: list[str]) -> bool:
    return "--debug" in args or os.environ.get("LORACTL_DEBUG") == "1"


def _next_step(e: LoractlError, args: list[str]) -> str:
    """The hint of an error raised without one: the command's help for a usage error, else the traceback."""
    from ..errors import UsageError

    command = next((f"loractl {a}" for a in args if a in COMMANDS), "loractl")
    if isinstance(e, UsageError):
        return f"see '{command} --help'"
    return f"'loractl --debug{command.removeprefix('loractl')} …' shows where it failed"
