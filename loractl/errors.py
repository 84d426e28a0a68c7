"""One error hierarchy: every failure a user can cause is a `LoractlError`.

Each error carries a message (what and where), an optional hint (what next) and the
exit code the CLI uses. Anything else that escapes is a bug and shows its traceback.
"""

from __future__ import annotations

from pathlib import Path


class LoractlError(Exception):
    """Base class; `exit_code` 1 = failed operation, 2 = usage error."""

    exit_code = 1
    default_hint: str | None = None  # what next, for a kind whose every error calls for the same step
    cli_hint: str | None = None  # the hint in the CLI's flags, where `hint` names a Python parameter

    def __init__(self, message: str, hint: str | None = None, path: str | Path | None = None) -> None:
        self.message = message
        self.hint = hint or self.default_hint
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UsageError(LoractlError):
    """The command line or arguments are inconsistent."""

    exit_code = 2


class InputNotFoundError(UsageError):
    """A path given on the command line does not exist."""

    default_hint = "check the path"

    @classmethod
    def check(cls, path: str | Path, what: str = "") -> None:
        """Raise unless `path` exists; `what` ("checkpoint ", "data file ") names its role."""
        if not Path(path).exists():
            raise cls(f"{what}{path} does not exist")


class OutputExistsError(UsageError):
    """The output path exists and replacing it was not asked for (`force=True`; `--force` in the CLI)."""

    cli_hint = "choose another path or pass --force"

    def __init__(self, output: str | Path) -> None:
        super().__init__(f"output {output} already exists", hint="choose another path, or pass force=True")
        self.output = str(output)


class OutputWriteError(LoractlError):
    """The output could not be written (a full disk, a quota, a file-size limit); nothing was left behind."""


class FormatError(LoractlError):
    """A file is unreadable, truncated, or not in the format it claims."""

    default_hint = "check that the file is complete and what its name says (a cut download or copy damages it)"


class TruncatedFileError(FormatError):
    """A file is empty or shorter than its own header says: an interrupted download, copy or write."""

    def __init__(self, message: str, path: str | Path) -> None:
        super().__init__(
            message, path=path, hint="the file is incomplete (an interrupted download, copy or write): get it again"
        )


class UnknownFormatError(FormatError):
    """No registered format recognises the file."""


class PickleRefusedError(FormatError):
    """A pickle file was found and `--allow-pickle` was not given."""


class AdapterError(LoractlError):
    """The adapter's tensors or config are inconsistent (A without B, rank mismatch, ...)."""

    default_hint = "'loractl validate ADAPTER' lists every problem it has"


class ShapeMismatchError(LoractlError):
    """An adapter does not fit the base checkpoint it is applied to."""

    default_hint = "the inputs were made for different models: 'loractl inspect ADAPTER' shows an adapter's base"


class IntegrityError(LoractlError):
    """A recorded hash does not match the data."""

    default_hint = "the data changed after its hash was recorded: get the file again"


class NumericError(LoractlError):
    """NaN or Inf where finite numbers are required."""

    default_hint = "an input holds NaN or Inf: 'loractl validate' names the tensors"
