"""The oracle rule: a missing consumer skips its interop tests locally and fails them in CI."""

from __future__ import annotations

import oracles
import pytest


def test_missing_oracle_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oracles, "REQUIRED", False)
    with pytest.raises(pytest.skip.Exception, match="no_such_consumer"):
        oracles.oracle("no_such_consumer", "no-such-consumer")
    monkeypatch.setattr(oracles, "REQUIRED", True)
    with pytest.raises(pytest.fail.Exception, match=r"pip install -e '\.\[interop\]'"):
        oracles.oracle("no_such_consumer", "no-such-consumer")
    assert oracles.oracle("json", "json").__name__ == "json"
