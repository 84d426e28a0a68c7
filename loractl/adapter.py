"""The canonical adapter: every format reads into it and writes from it.

Conventions (PEFT's orientation, FORMATS.md §11):
    linear     A (rank, in)            B (out, rank)         ΔW (out, in)
    conv       A (rank, in, *kernel)   B (out, rank, 1, ...) ΔW (out, in, *kernel)
    embedding  A (rank, num_embeddings) B (dim, rank)        ΔW (num_embeddings, dim)
`scale` is the factor applied to B·A and the single source of truth; `alpha` and the
`scale_rule` only say how the source file wrote it. `fan_in_fan_out` marks a GPT-2
Conv1D base whose stored weight is (in, out): only the merged ΔW is transposed.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import AdapterError
from .info import ModuleKind, ScaleRule
from .io.tensor_bytes import dtype_code


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ΔW = scale · B · A (see the module docstring for shapes)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float | None = None
    scale_rule: ScaleRule = "alpha/r"
    kind: ModuleKind = "linear"
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None  # DoRA, (out,)
    bias: torch.Tensor | None = None  # lora_B.bias, (out,)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def check(self, module: str) -> None:
        """Raise `AdapterError` unless A and B fit together."""
        if self.A.ndim < 2 or self.B.ndim < 2:
            raise AdapterError(
                f"module {module!r}: A {tuple(self.A.shape)} and B {tuple(self.B.shape)} must be 2-D or more"
            )
        if self.B.shape[1] != self.A.shape[0]:
            raise AdapterError(
                f"module {module!r}: rank mismatch, A is {tuple(self.A.shape)} but B is {tuple(self.B.shape)}",
                hint="A must be (rank, in) and B (out, rank)",
            )
        if not math.isfinite(self.scale):
            raise AdapterError(f"module {module!r}: scale {self.scale} is not finite")

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW in `dtype` (float32 default), in the base weight's layout (transposed for Conv1D and embeddings)."""
        a, b = self.A.to(dtype), self.B.to(dtype)
        if self.kind == "conv":
            delta = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
        else:
            delta = b @ a
        delta = delta * self.scale
        if self.kind == "embedding" or self.fan_in_fan_out:
            delta = delta.T
        return delta

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's tensors under canonical role names."""
        out = {"A": self.A, "B": self.B}
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        if self.bias is not None:
            out["bias"] = self.bias
        return out


@dataclass(frozen=True)
class AdapterMeta:
    """What an adapter says about itself besides tensors."""

    base_model: str | None = None
    base_revision: str | None = None
    base_fingerprint: str | None = None
    base_views: dict[str, str] = field(default_factory=dict)  # the fingerprint as if cast to bf16/fp16
    source_format: str | None = None
    task_type: str | None = None
    recorded_hash: str | None = None  # the content hash loractl recorded when it wrote the file
    extra: dict[str, Any] = field(default_factory=dict)  # source config kept for round trips


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter: modules by base module path, full tensors by base tensor name."""

    modules: dict[str, LoraModule]
    full_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: AdapterMeta = field(default_factory=AdapterMeta)
    lineage: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()

    def check(self) -> None:
        """Raise `AdapterError` on the first inconsistent module."""
        for name, module in self.modules.items():
            module.check(name)

    def content_hash(self) -> str:
        """sha256 over canonical tensors and scales, in sorted order: independent of the file format."""
        h = hashlib.sha256()
        for name in sorted(self.modules):
            m = self.modules[name]
            _feed(h, f"module:{name}:{m.kind}:{int(m.fan_in_fan_out)}".encode())
            h.update(struct.pack("<d", m.scale))
            for role, t in sorted(m.tensors().items()):
                _feed(h, role.encode())
                _feed_tensor(h, t)
        for key in sorted(self.full_tensors):
            _feed(h, f"full:{key}".encode())
            _feed_tensor(h, self.full_tensors[key])
        return "sha256:" + h.hexdigest()

    def with_lineage(self, entry: dict[str, Any]) -> Adapter:
        """A copy with one more lineage entry."""
        return replace(self, lineage=(*self.lineage, entry))

    @property
    def dtypes(self) -> set[str]:
        return {_dtype_name(t) for m in self.modules.values() for t in m.tensors().values()}

    def num_parameters(self) -> int:
        """Trainable parameters: LoRA factors, DoRA magnitudes, biases and full tensors."""
        lora = sum(t.numel() for m in self.modules.values() for t in m.tensors().values())
        return lora + sum(t.numel() for t in self.full_tensors.values())


def _feed(h: Any, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def _feed_tensor(h: Any, t: torch.Tensor) -> None:
    _feed(h, f"{_dtype_name(t)}{list(t.shape)}".encode())
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    h.update(struct.pack("<Q", raw.nbytes))
    h.update(raw.data)


def _dtype_name(t: torch.Tensor) -> str:
    return dtype_code(t.dtype)
