"""`loractl push`: publish an adapter as one commit (one version) on the Hub or a file:// registry."""

from __future__ import annotations

from functools import partial

import click

from ._hub import registry_options, run_transfer
from ._input_options import Inputs, input_options
from ._output import stdout
from ._text import short_hash, short_sha


@click.command("push")
@click.argument("adapter", type=click.Path())
@click.argument("repo")
@click.option("--tag", default=None, help="Also create this immutable tag on the pushed commit.")
@click.option("--force-tag", is_flag=True, help="Move --tag here if it already names another commit.")
@click.option("--branch", default=None, help="Branch to push to (default: main; created from main if new).")
@click.option("-m", "--message", default=None, help="Commit title (default: the content hash).")
@click.option("--private", is_flag=True, help="With --create: make the new repository private.")
@click.option("--create", is_flag=True, help="Create the repository if it does not exist.")
@registry_options
@input_options(per_input=False)
def command(
    adapter: str,
    repo: str,
    tag: str | None,
    force_tag: bool,
    branch: str | None,
    message: str | None,
    private: bool,
    create: bool,
    endpoint: str | None,
    token: str | None,
    as_json: bool,
    inputs: Inputs,
) -> None:
    """Push ADAPTER to REPO: its files plus a generated model card, as exactly one commit.

    REPO is owner/name or hf://owner/name (the Hub) or file:///DIR/owner/name (a local registry).
    A push that changes nothing makes no commit. If someone else pushed to the branch meanwhile,
    the push fails with a conflict instead of overwriting.

    \b
    Examples:
      loractl push my-adapter alice/my-lora --create --tag v1
      loractl push my-adapter file:///srv/registry/alice/my-lora --branch experiments -m "rank 16"
    """
    from ..remote import push

    call = partial(push, adapter, repo, branch=branch, tag=tag, force_tag=force_tag, message=message,
                   private=private, create=create)  # fmt: skip
    if (result := run_transfer(call, endpoint, token, as_json, inputs)) is None:
        return
    sha, content = short_sha(result.sha), f"content {short_hash(result.content_hash)}"
    if result.changed:
        stdout.print(f"pushed {sha} to {result.url} (branch {result.branch}, {content})", highlight=False)
    else:
        stdout.print(
            f"unchanged: {result.branch} of {result.url} is already {sha} ({content}); no commit made", highlight=False
        )
    if result.tag:
        stdout.print(f"tag {result.tag} → {sha}", highlight=False)
