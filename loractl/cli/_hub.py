"""Options and renderers shared by `push`, `pull` and `versions`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from ._output import stderr

F = TypeVar("F", bound=Callable[..., Any])


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
