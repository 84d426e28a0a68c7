"""The options of every command that reads an adapter, defined once: --from, --allow-pickle, --alpha,
--scale and --base, so that a hint naming one of them is right on every command that prints it.

`--alpha` and `--scale` fill only what a file lacks (the readers refuse them for a file that records
its own); a command that reads several adapters takes them per input too, as `--alpha PATH=16`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from ..formats.options import ReadOptions

F = TypeVar("F", bound=Callable[..., Any])

ALPHA_HELP = "Alpha for formats that do not store one (loralib, torchtune .pt)."
SCALE_HELP = "Scale for formats that do not store one (old mlx .npz)."
PER_INPUT_HELP = " PATH=VALUE gives it for one input only."


@dataclass(frozen=True)
class Inputs:
    """How to read the command's adapters: the format (`--from`; None: detected) and `ReadOptions`;
    `per_input` holds the `--alpha PATH=…`/`--scale PATH=…` values by path."""

    format: str | None
    read: ReadOptions
    per_input: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # path → {"alpha": 16.0}

    def options(self, path: str | Path) -> ReadOptions:
        """The read options for the input `path`: its own `--alpha`/`--scale` where given."""
        own = self.per_input.get(str(path), {})
        return replace(self.read, alpha=own.get("alpha", self.read.alpha), scale=own.get("scale", self.read.scale))


def input_options(*, base: bool = True, alpha_help: str = ALPHA_HELP, per_input: bool = True) -> Callable[[F], F]:
    """Add --from, --allow-pickle, --alpha, --scale and --base; the command gets them as `inputs: Inputs`.

    `base=False` where BASE is an argument (merge): the readers then get that base. `per_input=False`
    where the command reads its inputs with one set of options (merge, push, rescale): `PATH=VALUE` is refused.
    """
    per = PER_INPUT_HELP if per_input else ""
    options = [
        click.option(
            "--from", "source_format", default=None, metavar="FORMAT", help="Input format (default: detected)."
        ),
        click.option("--allow-pickle", is_flag=True, help="Allow pickle inputs (loaded with weights_only=True)."),
        click.option("--alpha", metavar="[PATH=]ALPHA", multiple=True, help=alpha_help + per),
        click.option("--scale", metavar="[PATH=]SCALE", multiple=True, help=SCALE_HELP + per),
    ]
    if base:
        help = "Base checkpoint: resolves kohya/GGUF names, RoPE head counts, loralib widths."
        options.append(click.option("--base", type=click.Path(exists=True), default=None, help=help))

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def with_inputs(*args: Any, **kwargs: Any) -> Any:
            from ..formats import check_format
            from ..formats.options import ReadOptions

            if kwargs["source_format"] is not None:
                check_format(kwargs["source_format"])  # before the command imports torch

            path = kwargs.pop("base") if base else None  # merge keeps its BASE argument
            values = {name: _values(name, kwargs.pop(name), per_input, kwargs) for name in ("alpha", "scale")}
            read = ReadOptions(
                allow_pickle=kwargs.pop("allow_pickle"),
                base=Path(path) if path else None,
                alpha=values["alpha"][0],
                scale=values["scale"][0],
            )
            by_path: dict[str, dict[str, float]] = {}
            for name, (_, given) in values.items():
                for p, value in given.items():
                    by_path.setdefault(p, {})[name] = value
            return command(*args, inputs=Inputs(kwargs.pop("source_format"), read, by_path), **kwargs)

        wrapped: Any = with_inputs
        for option in reversed(options):
            wrapped = option(wrapped)
        return wrapped  # type: ignore[no-any-return]

    return decorate


def _values(
    name: str, raw: tuple[str, ...], per_input: bool, arguments: dict[str, Any]
) -> tuple[float | None, dict[str, float]]:
    """`--alpha 16 --alpha run2=8` → (16.0, {"run2": 8.0}); a PATH that names no input of the command is refused."""
    default: float | None = None
    by_path: dict[str, float] = {}
    inputs = {str(v) for a in arguments.values() for v in (a if isinstance(a, tuple) else (a,)) if v is not None}
    for text in raw:
        path, _, number = text.rpartition("=")
        value = _number(name, number, text)
        if not path:
            if default is not None:
                raise click.BadParameter(f"given twice ({default:g} and {value:g})", param_hint=f"--{name}")
            default = value
        elif not per_input:
            raise click.BadParameter(
                f"{text!r}: this command takes one --{name} for all its inputs", param_hint=f"--{name}"
            )
        elif path not in inputs:
            raise click.BadParameter(f"{text!r}: {path!r} is not an input of this command", param_hint=f"--{name}")
        else:
            by_path[path] = value
    return default, by_path


def _number(name: str, number: str, text: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a number or PATH=NUMBER", param_hint=f"--{name}") from None
