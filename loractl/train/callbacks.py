"""What the loop reports and to whom: the `Hooks` protocol, a do-nothing `Callback`, the JSONL metrics log.

Only rank 0 calls hooks, so a callback never needs to know how many processes train.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol


class Hooks(Protocol):
    """What the loop calls on rank 0: at the start, after each logged step, eval and checkpoint."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, metrics: dict[str, Any]) -> bool | None: ...
    def on_eval(self, metrics: dict[str, Any]) -> None: ...
    def on_save(self, path: Path, step: int) -> None: ...


class Callback:
    """`Hooks` that do nothing: subclass and override what you need. `on_step` returning True stops the run."""

    def on_start(self, info: dict[str, Any]) -> None:
        return None

    def on_step(self, metrics: dict[str, Any]) -> bool | None:
        return None

    def on_eval(self, metrics: dict[str, Any]) -> None:
        return None

    def on_save(self, path: Path, step: int) -> None:
        return None


class MetricsLog(Callback):
    """Appends one JSON object per logged step and per eval to a JSONL file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_step(self, metrics: dict[str, Any]) -> bool | None:
        self._write(metrics)
        return None

    def on_eval(self, metrics: dict[str, Any]) -> None:
        self._write(metrics)

    def _write(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(doc, sort_keys=True) + "\n")
