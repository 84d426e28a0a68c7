"""The real consumers that judge loractl's files (issue 13), and the rule for when one is missing.

Locally a missing oracle skips its tests; in CI (`LORACTL_REQUIRE_ORACLES=1`, set by `.ci/run`)
it fails them, so that an install problem cannot pass as a green run.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRED = os.environ.get("LORACTL_REQUIRE_ORACLES") == "1"


def oracle(module: str, package: str, extra: str = "interop") -> ModuleType:
    """Import the consumer `module` (PyPI `package`, in loractl's `extra`), or skip/fail the test without it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        message = f"oracle {package} is not installed ({e}); pip install -e '.[{extra}]'"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)


def consumer_version(package: str) -> str:
    """The installed version of a consumer, as the docs quote it."""
    from importlib.metadata import version

    return version(package)
