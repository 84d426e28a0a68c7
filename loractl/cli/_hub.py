"""Options and renderers shared by `push`, `pull` and `versions`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ._output import Report, emit_json, stderr

if TYPE_CHECKING:
    from ._input_options import Inputs

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R", bound=Report)


def registry_options(func: F) -> F:
    """`--endpoint`, `--token` and `--json`, in the same words on every registry command."""
    func = click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")(func)
    func = click.option("--token", default=None, help="Hub token (default: HF_TOKEN, then the stored login).")(func)
    return click.option("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co).")(func)


@contextmanager
def quiet_hub_progress() -> Iterator[None]:
    """huggingface_hub draws its own bars on stderr; keep them only for a terminal (like ours)."""
    if stderr.is_terminal:
        yield
        return
    from huggingface_hub.utils.tqdm import disable_progress_bars

    with disable_progress_bars():
        yield


def run_transfer(
    call: Callable[..., R], endpoint: str | None, token: str | None, as_json: bool, inputs: Inputs
) -> R | None:
    """`push` or `pull` (`call`, its own arguments bound) with the registry and reading options, quietly;
    None when the result went out as `--json`, else the result to render."""
    with quiet_hub_progress():
        result = call(endpoint=endpoint, token=token, format=inputs.format, read_options=inputs.read)
    if as_json:
        emit_json(result.to_dict())
        return None
    return result
