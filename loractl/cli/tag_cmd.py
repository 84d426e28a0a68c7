"""`loractl tag`: create, move or delete a tag on purpose (push never moves one by accident)."""

from __future__ import annotations

import click

from ._hub import quiet_hub_progress, registry_options
from ._output import emit_json, stdout
from ._text import short_sha


@click.command("tag")
@click.argument("repo")
@click.argument("name")
@click.option("--delete", is_flag=True, help="Delete the tag NAME.")
@click.option("--force", is_flag=True, help="Move NAME to REPO's @REV if it names another commit.")
@registry_options
def command(
    repo: str, name: str, delete: bool, force: bool, endpoint: str | None, token: str | None, as_json: bool
) -> None:
    """Tag REPO[@REV] (default main) as NAME, move the tag with --force, or remove it with --delete.

    \b
    Examples:
      loractl tag alice/my-lora@3f2a9c1 v1
      loractl tag alice/my-lora@main v1 --force
      loractl tag alice/my-lora v1 --delete
    """
    from ..remote import tag

    with quiet_hub_progress():
        result = tag(repo, name, delete=delete, force=force, endpoint=endpoint, token=token)
    if as_json:
        emit_json(result.to_dict())
    elif result.sha is None:
        stdout.print(f"deleted tag {name} (was {short_sha(result.previous)}) in {result.url}", highlight=False)
    elif result.previous not in (None, result.sha):
        stdout.print(f"moved tag {name}: {short_sha(result.previous)} → {short_sha(result.sha)}", highlight=False)
    else:
        stdout.print(f"tag {name} → {short_sha(result.sha)} in {result.url}", highlight=False)
