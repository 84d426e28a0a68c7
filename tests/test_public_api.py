"""The top-level names resolve, lazily (importing loractl itself does not import torch)."""

from __future__ import annotations

import subprocess
import sys

import loractl


def test_every_exported_name_resolves() -> None:
    for name in loractl.__all__:
        assert getattr(loractl, name) is not None, name


def test_importing_loractl_does_not_import_torch() -> None:
    code = "import sys, loractl; loractl.describe_adapter; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
