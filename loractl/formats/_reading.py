"""Turn a described adapter plus a tensor getter into the canonical `Adapter`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..adapter import Adapter, AdapterMeta, LoraModule
from ..errors import AdapterError
from ..info import AdapterInfo


def adapter_from_info(info: AdapterInfo, get: Callable[[str], torch.Tensor]) -> Adapter:
    """Load every tensor `info` names; refuses an adapter with structural errors."""
    if info.errors:
        first = info.errors[0]
        raise AdapterError(first.render(), path=info.path, hint="run 'loractl validate' to list every problem")
    modules = {}
    for name, m in info.modules.items():
        tensors = {role: get(key) for role, key in m.keys.items()}
        modules[name] = LoraModule(
            A=tensors["A"],
            B=tensors["B"],
            scale=m.scale,
            alpha=m.alpha,
            scale_rule=m.scale_rule,
            kind=m.kind,
            fan_in_fan_out=m.fan_in_fan_out,
            magnitude=tensors.get("magnitude"),
            bias=tensors.get("bias"),
        )
    record = info.record
    meta = AdapterMeta(
        base_model=info.base_model,
        base_revision=info.base_revision,
        base_fingerprint=record.base_fingerprint if record else None,
        base_views=dict(record.base_views) if record else {},
        source_format=info.format,
        task_type=info.task_type,
        recorded_hash=record.content_hash if record else None,
        extra={"config": info.config},
    )
    return Adapter(
        modules=modules,
        full_tensors={name: get(t.key) for name, t in info.full_tensors.items()},
        meta=meta,
        lineage=record.lineage if record else (),
        warnings=tuple(f.render() for f in info.findings),
    )
