"""`loractl versions`: the commits and tags of an adapter repository."""

from __future__ import annotations

import click

from ._hub import quiet_hub_progress, registry_options
from ._output import emit_json, stdout
from ._text import fit_path, short_hash, short_sha


@click.command("versions")
@click.argument("repo")
@click.option("--branch", default=None, help="Branch whose history to list (default: REPO's @REV or main).")
@registry_options
def command(repo: str, branch: str | None, endpoint: str | None, token: str | None, as_json: bool) -> None:
    """List REPO's versions: commits (sha, date, message), tags, and each version's content hash.

    \b
    Examples:
      loractl versions alice/my-lora
      loractl versions file:///srv/registry/alice/my-lora --json
    """
    from rich.table import Table

    from ..remote import versions

    with quiet_hub_progress():
        listing = versions(repo, branch=branch, endpoint=endpoint, token=token)
    if as_json:
        emit_json(listing.to_dict())
        return
    branch = f" ({listing.branch})"
    table = Table(title=fit_path(listing.url, stdout.get().width - len(branch)) + branch, title_justify="left")
    for column in ("commit", "date", "tags", "content hash"):
        table.add_column(column, no_wrap=True)  # fixed-width identifiers: never cut
    table.add_column("message", overflow="fold")  # wraps at spaces; a long word is folded, not cut
    for v in listing.versions:
        date = v.date.strftime("%Y-%m-%d %H:%M") if v.date else "-"
        table.add_row(short_sha(v.sha), date, ", ".join(v.tags), short_hash(v.content_hash), v.title)
    stdout.print(table)
    elsewhere = {t: s for t, s in listing.tags.items() if s not in {v.sha for v in listing.versions}}
    for tag, sha in sorted(elsewhere.items()):
        stdout.print(f"tag {tag} → {short_sha(sha)} (not on {listing.branch})", highlight=False)
