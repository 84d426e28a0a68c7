"""A Hugging Face checkpoint as a base: a directory of safetensors shards (with an index) or one file.

Modules land on `<module>.weight` as they are named: the adapter and the base speak the same
names. The merge itself streams this kind in row blocks into new shards (`ops/merge.py`); this
module gives it what every base gives: its tensors, reading, and the fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..findings import Finding, error
from ..io.checkpoint import STREAM, Checkpoint, touched_weight_names
from ._placement import Placement
from .protocol import BaseTensor

if TYPE_CHECKING:
    import torch

    from ..formats.options import ReadOptions
    from ..info import AdapterInfo, ModuleInfo
    from .protocol import Weights


def detect(path: Path) -> bool:
    """Anything else: the checkpoint reader says what is wrong with a path that is no checkpoint."""
    return True


def open(path: Path) -> CheckpointBase:
    return CheckpointBase(path)


class CheckpointBase:
    """`io.checkpoint.Checkpoint` behind the `bases.Base` interface."""

    kind = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.ckpt = Checkpoint(path)

    def close(self) -> None:
        self.ckpt.close()

    def tensors(self) -> dict[str, BaseTensor]:
        return {n: BaseTensor(n, (i := self.ckpt.info(n)).shape, i.dtype) for n in self.ckpt.names}

    def read_options(self, fmt: str, options: ReadOptions) -> ReadOptions:
        from dataclasses import replace

        return replace(options, base=self.path)

    def place(self, module: str, m: ModuleInfo, adapter: AdapterInfo) -> Placement | Finding:
        key = f"{module}.weight"
        return Placement(key) if key in self.ckpt else error("not-in-base", f"the base has no tensor {key!r}", module)

    def read_float32(self, name: str) -> torch.Tensor:
        return self.ckpt.get(name).float()

    def weights(self) -> Weights:
        return self.ckpt

    def fingerprint(
        self, modules: Iterable[str], stop: Callable[[], bool] | None = None, *, fresh: bool = False,
        scheme: str = STREAM,
    ) -> str | None:  # fmt: skip
        return self.ckpt.fingerprint(touched_weight_names(modules, self.ckpt), stop, fresh=fresh, scheme=scheme)

    def fingerprint_views(self, modules: Iterable[str]) -> dict[str, str]:
        return self.ckpt.fingerprint_views(touched_weight_names(modules, self.ckpt))
