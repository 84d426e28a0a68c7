"""`TrainConfig`: every hyper-parameter of a training run and its default, in one place.

A run is fully described by its config (plus base and data): the same config and seed
give the same adapter. `--config FILE` (JSON or TOML) sets fields; flags override it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..choices import (
    BASE_DTYPES,
    DEVICES,
    PRECISIONS,
    QUANTIZE,
    SCHEDULES,
    BaseDtype,
    Device,
    Init,
    Precision,
    Quantize,
    Schedule,
)
from ..errors import InputNotFoundError, UsageError

# Targets: a tuple of module-name suffixes, "all-linear", or a regex matched against full module paths.
Targets = tuple[str, ...] | str
DEFAULT_STEPS = 100
NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")  # PEFT's fast PiSSA: N subspace iterations of svd_lowrank


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a LoRA training run (defaults follow PEFT and the LoRA paper)."""

    rank: int = 8
    alpha: float = 16.0
    targets: Targets = ("q_proj", "v_proj")
    exclude: Targets | None = None
    rslora: bool = False
    dropout: float = 0.0
    init: Init | str = "kaiming"  # or pissa_niter_N (`lora_init`)
    lora_plus_ratio: float | None = None  # LoRA+: B's learning rate is lr × ratio (PEFT's loraplus_lr_ratio)
    lora_plus_embedding_lr: float = 1e-6  # LoRA+: the embedding LoRA's learning rate (PEFT's default)
    dora: bool = False  # DoRA (PEFT's use_dora): a trained magnitude per output row
    train_modules: tuple[str, ...] | None = None  # trained in full, saved whole (PEFT's modules_to_save)
    add_tokens: tuple[str, ...] | None = None  # tokens added to the tokenizer; the embeddings are resized
    chat_template: str | None = None  # a Jinja file replacing the tokenizer's; its missing <|tokens|> are added
    steps: int | None = None  # None: from `epochs`, or DEFAULT_STEPS when neither is set
    epochs: float | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: Schedule = "cosine"
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    max_len: int = 512
    packing: bool = False
    grad_checkpointing: bool = False
    precision: Precision = "fp32"
    seed: int = 0
    save_every: int = 0  # 0: only the final adapter
    eval_every: int = 0  # 0: eval once at the end (when eval data is given)
    log_every: int = 1
    fsdp: bool = False  # shard the base over the ranks (FSDP) instead of replicating it (DDP)
    base_dtype: BaseDtype | None = None  # None: the checkpoint's own dtype; LoRA factors stay float32
    quantize: Quantize | None = None  # load the frozen base through bitsandbytes (QLoRA)
    device: Device = "auto"  # auto: CUDA when present, else the CPU
    compile: bool = False  # torch.compile each decoder layer

    def check(self) -> None:
        """Raise `UsageError` on values no run can use, before anything is loaded."""
        _positive(self, "rank", "batch_size", "grad_accum", "max_len", "log_every")
        _non_negative(self, "warmup", "save_every", "eval_every", "weight_decay")
        if self.lr <= 0 or self.alpha <= 0:
            raise UsageError(f"lr ({self.lr}) and alpha ({self.alpha}) must be positive")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"dropout {self.dropout} must be in [0, 1)")
        if self.steps is not None and self.epochs is not None:
            raise UsageError(
                "give --steps or --epochs, not both",
                hint="keep one: --steps N counts optimizer steps, --epochs E passes over the data",
            )
        if (self.steps is not None and self.steps <= 0) or (self.epochs is not None and self.epochs <= 0):
            raise UsageError("--steps and --epochs must be positive", hint="e.g. --steps 200 or --epochs 1")
        _choice(self, "schedule", SCHEDULES)
        _choice(self, "precision", PRECISIONS)
        check_init(self.init)
        self._check_variants()
        _choice(self, "device", DEVICES)
        if self.base_dtype is not None:
            _choice(self, "base_dtype", BASE_DTYPES)
        if self.quantize is not None:
            _choice(self, "quantize", QUANTIZE)
        if self.fsdp and self.quantize == "int8":
            raise UsageError(
                "--fsdp does not shard an int8 base: bitsandbytes stores int8 weights as int8 tensors (4-bit ones "
                "can be stored as float32), and FSDP flattens each decoder layer's parameters, float32 LoRA "
                "factors included, into one tensor of one dtype",
                hint="use --quantize nf4 or fp4 with --fsdp (stored in the compute dtype), or int8 with DDP",
            )
        if self.fsdp and (self.train_modules or self.add_tokens):
            raise UsageError(
                "--fsdp trains LoRA layers only (not --train-modules or --add-tokens)",
                hint="use one process or DDP (--nproc without --fsdp) to train modules in full",
            )
        if self.fsdp and self.precision == "fp16":
            raise UsageError(
                "--fsdp does not support --precision fp16 (its loss scaling is per rank)",
                hint="use --precision bf16 or fp32 with --fsdp",
            )

    def _check_variants(self) -> None:
        """PiSSA/OLoRA and LoRA+ where they are exact (see `lora_init`, `lora_plus`)."""
        if self.lora_plus_ratio is not None and self.lora_plus_ratio <= 0:
            raise UsageError(f"lora-plus-ratio must be positive, got {self.lora_plus_ratio}", hint="e.g. 16")
        if self.lora_plus_embedding_lr <= 0:
            raise UsageError(f"lora-plus-embedding-lr must be positive, got {self.lora_plus_embedding_lr}")
        if not is_residual_init(self.init):
            return
        clash = "--dora" if self.dora else "--quantize" if self.quantize else "--fsdp" if self.fsdp else None
        if clash is not None:
            why = {
                "--dora": "PEFT's conversion back to the original base drops DoRA's magnitude",
                "--quantize": "the residual would be re-quantized, so neither the start nor the converted "
                "adapter would hold on the base (PEFT refuses PiSSA on quantized weights)",
                "--fsdp": "the starting factors are not gathered across shards",
            }[clash]
            raise UsageError(f"--init {self.init} does not combine with {clash}: {why}",
                             hint=f"use --init kaiming with {clash}, or drop {clash}")  # fmt: skip

    def total_steps(self, num_examples: int, world_size: int = 1) -> int:
        """Optimizer steps of the run: `steps`, or enough global batches to cover `epochs`."""
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            return DEFAULT_STEPS
        global_batch = self.batch_size * self.grad_accum * world_size
        return max(1, -(-int(self.epochs * num_examples) // global_batch))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists), for lineage and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """A config from a mapping; unknown keys are a `UsageError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise UsageError(
                f"{source}: unknown setting(s) {', '.join(unknown)}", hint=f"known: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()}
        return replace(cls(), **values)


def is_residual_init(init: str) -> bool:
    """Whether `init` takes the factors from the base weight and leaves the residual in the base."""
    return init in ("pissa", "olora") or NITER.fullmatch(init) is not None


def check_init(init: str) -> None:
    """Raise `UsageError` unless `init` is kaiming, gaussian, pissa, pissa_niter_N or olora."""
    if init not in ("kaiming", "gaussian") and not is_residual_init(init):
        raise UsageError(
            f"init {init!r} is not one of: kaiming, gaussian, pissa, pissa_niter_N, olora",
            hint="e.g. --init pissa, or --init pissa_niter_4 for the fast randomized SVD",
        )


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The file's settings (JSON or TOML), then `overrides` (None values ignored), checked."""
    doc: dict[str, Any] = {}
    if path is not None:
        doc = _read_file(Path(path))
    doc.update({k: v for k, v in overrides.items() if v is not None})
    config = TrainConfig.from_dict(doc, source=str(path or "options"))
    config.check()
    return config


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputNotFoundError(f"config file {path} does not exist", hint="check the path")
    try:
        doc = _toml(path) if path.suffix == ".toml" else json.loads(path.read_text())
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        raise UsageError(
            f"config file is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}", path=path
        ) from None
    if not isinstance(doc, dict):
        raise UsageError("config file must hold an object of settings", path=path)
    return doc


def _toml(path: Path) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise UsageError("TOML config files need Python 3.11+", hint="write the config as JSON") from None
    return tomllib.loads(path.read_text())


def _positive(config: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            hint = "LoRA needs a rank of at least 1" if name == "rank" else None
            raise UsageError(f"{name.replace('_', '-')} must be positive, got {getattr(config, name)}", hint=hint)


def _non_negative(config: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise UsageError(f"{name.replace('_', '-')} must not be negative, got {getattr(config, name)}")


def _choice(config: TrainConfig, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(config, name) not in allowed:
        raise UsageError(f"{name} {getattr(config, name)!r} is not one of: {', '.join(allowed)}")
