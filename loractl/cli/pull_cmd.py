"""`loractl pull`: fetch one version of an adapter, verified, into a new directory."""

from __future__ import annotations

from functools import partial

import click

from ._hub import registry_options, run_transfer
from ._input_options import Inputs, input_options
from ._output import stdout
from ._text import short_hash, short_sha


@click.command("pull")
@click.argument("repo")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Directory to create.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--include", multiple=True, help="Pull only paths matching this glob (repeatable), e.g. 'style-a/*'.")
@click.option("--exclude", multiple=True, help="Leave out paths matching this glob (repeatable).")
@registry_options
@input_options(per_input=False)
def command(
    repo: str,
    out: str,
    force: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    endpoint: str | None,
    token: str | None,
    as_json: bool,
    inputs: Inputs,
) -> None:
    """Pull REPO[@REV] into OUT: REV (branch, tag, short or full sha; default main) is resolved first.

    Every file is checked against the registry's hashes and the adapter against its own content
    hash before OUT appears; OUT/.loractl-origin.json records the resolved commit. A commit pulled
    once can be pulled again offline.

    \b
    Examples:
      loractl pull alice/my-lora@v1 -o my-lora-v1
      loractl pull file:///srv/registry/alice/my-lora@3f2a9c1 -o /tmp/lora
      loractl pull alice/styles@v2 -o style-a --include 'style-a/*'
    """
    from ..remote import pull

    call = partial(pull, repo, out, include=include, exclude=exclude, force=force)
    if (result := run_transfer(call, endpoint, token, as_json, inputs)) is None:
        return
    stdout.print(
        f"pulled {result.url}@{result.revision} = {short_sha(result.sha)} into {result.out} "
        f"(content {short_hash(result.content_hash)}, verified)",
        highlight=False,
    )
