"""Shared test fixtures: the shipped fixtures, the real files other tools wrote, tiny models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
REAL_ADAPTERS = ROOT.parent / "shared" / "real-adapters"

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=40)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seeded_global_rngs() -> None:
    """Every test starts from the same global RNG states, so a draw that takes no generator (a layer's
    initialisation, a library's own sampling) is the same on every run: no test can be flaky by chance."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _fingerprint_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Base fingerprints are remembered under pytest's temp dir (subprocesses too), never in the user's cache."""
    os.environ["LORACTL_CACHE_DIR"] = str(tmp_path_factory.mktemp("loractl-cache"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run ~10x faster on one torch thread than on two cores shared with other work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def real_adapters() -> Path:
    """`../shared/real-adapters` beside the checkout; tests using it skip when it is absent."""
    if not REAL_ADAPTERS.is_dir():
        pytest.skip("../shared/real-adapters is not present")
    return REAL_ADAPTERS


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint (built once per machine; see tests/real_model.py)."""
    from real_model import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_lora(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A PEFT LoRA (made by PEFT, r=4, alpha=8) on every linear layer of SmolLM2 that moves its logits by ~4%,
    and the PeftModel holding it: the reference the interop tests hold the consumers to."""
    from interop_models import peft_adapter

    out = tmp_path_factory.mktemp("smollm2-lora") / "peft"
    return out, peft_adapter(smollm2, out, r=4, alpha=8.0, std=0.02, seed=0)
