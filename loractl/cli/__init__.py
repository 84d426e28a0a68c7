"""The `loractl` command line: a lazy click group and the one place errors are rendered.

Command modules are imported only when their command runs (or `--help` lists them), and
none imports torch at module level, so `loractl --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .._version import __version__

if TYPE_CHECKING:
    from ..errors import LoractlError

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
    from ._output import tolerate_narrow_encodings

    tolerate_narrow_encodings()
    # A file-size limit (ulimit -f) then fails the write with EFBIG, which `atomic_output` turns
    # into an error with a hint, instead of SIGXFSZ killing the process mid-write.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        result = cli.main(args=argv, prog_name="loractl", standalone_mode=False)
        if isinstance(result, int) and not isinstance(result, bool) and result:
            sys.exit(result)  # without standalone mode, click returns a command's ctx.exit(code)
        return result
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except LoractlError as e:
        _fail(e, argv)
    except OSError as e:
        from ..io.atomic import WRITE_ERRNOS, os_error

        if e.errno not in WRITE_ERRNOS:
            raise
        _fail(os_error(e), argv)  # a read-only, full or blocked path outside the atomic writers


def _fail(e: LoractlError, argv: list[str] | None) -> NoReturn:
    """Render one error as `error:` and `hint:` lines on stderr (the traceback only when debugging) and exit."""
    if "--debug" in (argv if argv is not None else sys.argv) or os.environ.get("LORACTL_DEBUG") == "1":
        traceback.print_exc()
    from ._text import printable

    click.echo(f"error: {printable(str(e))}", err=True)
    if e.hint:
        click.echo(f"hint: {printable(e.hint)}", err=True)
    sys.exit(e.exit_code)
