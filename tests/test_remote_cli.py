"""`loractl push / pull / versions` through the real entry point: exit codes, stdout, error rendering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cli_runner import run

if TYPE_CHECKING:
    from fakehub import FakeHub

pytest_plugins = ("fakehub",)

ROOT = Path(__file__).resolve().parent.parent
V1 = ROOT / "fixtures" / "adapters" / "tiny-qv"
V2 = ROOT / "fixtures" / "adapters" / "tiny-patterns"


def test_file_registry_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = f"file://{tmp_path}/registry/alice/lora"
    code, out, _ = run(capsys, "push", str(V1), repo, "--create", "--tag", "v1", "--json")
    assert code == 0
    first = json.loads(out)
    assert first["changed"] and first["tag"] == "v1"

    code, out, _ = run(capsys, "push", str(V1), repo)
    assert code == 0 and out.startswith("unchanged:") and "no commit made" in out

    assert run(capsys, "push", str(V2), repo, "-m", "patterns")[0] == 0
    code, out, _ = run(capsys, "pull", f"{repo}@v1", "-o", str(tmp_path / "out"), "--json")
    assert code == 0 and json.loads(out)["sha"] == first["sha"]
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        V1 / "adapter_model.safetensors"
    ).read_bytes()

    code, out, _ = run(capsys, "versions", repo, "--json")
    listing = json.loads(out)
    assert code == 0 and [v["title"] for v in listing["versions"]][:1] == ["patterns"]
    assert listing["tags"] == {"v1": first["sha"]}
    assert listing["versions"][1]["content_hash"] == first["content_hash"]

    code, out, _ = run(capsys, "versions", repo)
    assert code == 0 and first["sha"][:12] in out and "v1" in out


def test_errors_are_one_line_with_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = f"file://{tmp_path}/registry/alice/lora"
    code, _, err = run(capsys, "pull", repo, "-o", str(tmp_path / "out"))
    assert code == 1 and err.startswith("error: ") and "not found" in err and "Traceback" not in err
    run(capsys, "push", str(V1), repo, "--create", "--tag", "v1")
    code, _, err = run(capsys, "push", str(V2), repo, "--tag", "v1")
    assert code == 1 and "tag 'v1'" in err and "hint: " in err
    code, _, err = run(capsys, "pull", "ftp://example/alice/lora", "-o", str(tmp_path / "x"))
    assert code == 2 and "hint: " in err


def test_hub_through_the_cli(hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    auth = ["--endpoint", hub.endpoint, "--token", "tok-alice"]
    code, out, _ = run(capsys, "push", str(V1), "alice/lora", "--create", "--tag", "v1", "--json", *auth)
    assert code == 0
    sha = json.loads(out)["sha"]
    code, out, _ = run(capsys, "pull", f"hf://alice/lora@{sha[:7]}", "-o", str(tmp_path / "out"), *auth)
    assert code == 0 and sha[:12] in out
    code, _, err = run(capsys, "versions", "alice/lora", "--endpoint", hub.endpoint, "--token", "tok-bad")
    assert code == 1 and "rejected the token" in err


@pytest.mark.slow  # two fresh processes (torch + huggingface_hub imports): 15-25 s on 2 shared cores
def test_hf_endpoint_from_the_environment(hub: FakeHub, tmp_path: Path) -> None:
    """A fresh process: huggingface_hub reads HF_ENDPOINT, HF_TOKEN and HF_HUB_CACHE at import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_TOKEN="tok-alice",
        HF_HOME=str(tmp_path / "home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1" if hub.upload_mode == "lfs" else "0",
    )
    cli = [sys.executable, "-m", "loractl"]
    pushed = subprocess.run(
        [*cli, "push", str(V1), "alice/lora", "--create", "--tag", "v1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pushed.returncode == 0, pushed.stderr
    pulled = subprocess.run(
        [*cli, "pull", "alice/lora@v1", "-o", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        V1 / "adapter_model.safetensors"
    ).read_bytes()
    assert hub.count("POST", r"/commit/main$") == 1
