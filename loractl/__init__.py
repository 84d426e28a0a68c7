"""loractl: LoRA adapters as versioned artifacts.

The public API is imported lazily so that `loractl --help` and header-only commands
never pay for `import torch` (1.7 s) when they do not touch tensor data.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    "Adapter": "adapter",
    "AdapterMeta": "adapter",
    "LoraModule": "adapter",
    "scale_from_alpha": "info",
    "LoractlError": "errors",
    "Checkpoint": "io.checkpoint",
    "ReadOptions": "formats.options",
    "WriteOptions": "formats.options",
    "MergeReport": "ops.merge_report",
    "load_adapter": "formats",
    "save_adapter": "formats",
    "detect_format": "formats",
    "describe_adapter": "formats",
    "inspect_adapter": "inspection",
    "validate_adapter": "validation",
    "merge": "ops.merge",
    "plan_merge": "ops.merge_plan",
    "extract": "ops.extract",
    "ExtractConfig": "ops.extract",
    "combine": "ops.combine",
    "CombineOptions": "ops.combine",
    "resize": "ops.resize",
    "resize_to_budget": "ops.resize",
    "diff": "ops.diff",
    "AdapterDiff": "ops.diff",
    "evaluate_adapters": "train.evaluation",
    "RankRule": "ops.lowrank",
    "rescale": "ops.rescale",
    "convert": "ops.convert",
    "push": "remote.transfer",
    "pull": "remote.transfer",
    "versions": "remote.transfer",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .adapter import Adapter, AdapterMeta, LoraModule
    from .errors import LoractlError
    from .formats import describe_adapter, detect_format, load_adapter, save_adapter
    from .formats.options import ReadOptions, WriteOptions
    from .info import scale_from_alpha
    from .inspection import inspect_adapter
    from .io.checkpoint import Checkpoint
    from .ops.combine import CombineOptions, combine
    from .ops.convert import convert
    from .ops.diff import AdapterDiff, diff
    from .ops.extract import ExtractConfig, extract
    from .ops.lowrank import RankRule
    from .ops.merge import merge
    from .ops.merge_plan import plan_merge
    from .ops.merge_report import MergeReport
    from .ops.rescale import rescale
    from .ops.resize import resize, resize_to_budget
    from .remote.transfer import pull, push, versions
    from .train.evaluation import evaluate_adapters
    from .validation import validate_adapter


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loractl' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
