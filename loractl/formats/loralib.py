"""microsoft/LoRA's `loralib` checkpoints, the paper's code (FORMATS.md §7).

A plain state dict (or `{"model_state_dict": ...}`, as the NLG scripts save) with bare
parameters `<module>.lora_A` (r, in) and `<module>.lora_B` (out, r), no `.weight`, beside
whatever else the script saved (a classifier head: full tensors). r and alpha are not in
the file: alpha comes from `--alpha` (scale = alpha / r), or from the `lora_alpha` entry
loractl writes. A `MergedLinear` (fused qkv with `enable_lora`) stores A (r·k, in) and
B (out/n·k, r); it reads as a LoRA of rank r·k on the fused layer with a block-diagonal B
(zero rows for disabled slices), which needs the fused layer's width from `--base`.
Embedding LoRA has the same keys; modules named like embeddings read as embeddings.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..findings import Finding, error, warning
from ..info import AdapterInfo, FullTensorInfo, ModuleInfo
from ..io.config_json import read_config
from ..io.values import finite_number
from ._state_dict import load_entries, save_pickle, sniff_keys
from .options import Feature, ReadOptions, WriteOptions, filled

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter

NAME = "loralib"
HOLDS: frozenset[Feature] = frozenset({"embedding", "full_tensors"})
FILLS = frozenset({"alpha"})
ALPHA_KEY = "lora_alpha"
RANK_KEY = "lora_r"
_KEY = re.compile(r"^(.+)\.lora_(A|B)$")
_EMBEDDING_LEAVES = re.compile(r"(embed|^wte$|^wpe$)")
_DEFAULT = ReadOptions()


def detect(path: Path) -> bool:
    """A state dict with bare `*.lora_A` keys (PEFT's end in `.lora_A.weight`)."""
    if path.is_dir():
        return False
    keys = sniff_keys(path)
    return keys is not None and any(k.endswith(".lora_A") for k in keys)


def describe(path: Path, options: ReadOptions = _DEFAULT) -> AdapterInfo:
    """Modules and scales (the pickle is loaded for its shapes: `--allow-pickle`; `--alpha` is required)."""
    return _Parsed(path, options).info


def read(path: Path, options: ReadOptions = _DEFAULT) -> Adapter:
    """Load the adapter; MergedLinear groups become one block-diagonal LoRA."""
    from ._reading import adapter_from_info

    parsed = _Parsed(path, options)
    return adapter_from_info(parsed.info, parsed.get)


def write(adapter: Adapter, path: Path, *, force: bool = False, options: WriteOptions | None = None) -> Path:
    """Write one pickle `{"model_state_dict": {...}, "lora_alpha": α, "lora_r": r}` (one alpha, one rank)."""

    from ..io.atomic import atomic_output
    from ._global_alpha import common_alpha, fold_to_alpha, max_rank

    options = options or WriteOptions()
    modules = {
        n: replace(m, magnitude=None, bias=None, fan_in_fan_out=False)
        for n, m in adapter.modules.items()
        if m.kind in ("linear", "embedding")
    }
    kept = replace(adapter, modules=modules)
    rank = max_rank(kept)
    alpha = options.alpha if options.alpha is not None else common_alpha(kept, rank)
    stored = fold_to_alpha(kept, alpha, rank)
    state: dict[str, torch.Tensor] = {}
    for name, m in sorted(stored.modules.items()):
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = m.A.contiguous(), m.B.contiguous()
    state.update(sorted(stored.full_tensors.items()))
    with atomic_output(path, force=force) as tmp:
        save_pickle(tmp, {"model_state_dict": state, ALPHA_KEY: float(alpha), RANK_KEY: rank})
    return path


class _Parsed:
    """The loaded state dict, grouped into modules, with MergedLinear groups resolved."""

    def __init__(self, path: Path, options: ReadOptions) -> None:
        self.path = path
        self.tensors, extras = load_entries(path, options.allow_pickle)
        alpha = filled(options.alpha, extras.get(ALPHA_KEY), "--alpha", path)
        if not isinstance(alpha, (int, float)):
            raise UsageError(
                "loralib checkpoints do not store lora_alpha: pass --alpha",
                path=path,
                hint="pass --alpha with the training script's --lora_alpha (e.g. 16 for the RoBERTa GLUE scripts)",
            )
        self.alpha = finite_number(alpha, "lora_alpha", path)
        self.base = _Base(options.base)
        self.findings: list[Finding] = []
        self.merged: dict[str, list[bool]] = {}  # B key → enable_lora
        self.info = self._describe()

    def get(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        if key not in self.merged:
            return t
        return _block_diagonal(t, self.merged[key], self.tensors[key[: -len("B")] + "A"].shape[0])

    def _describe(self) -> AdapterInfo:
        groups: dict[str, dict[str, str]] = {}
        full = {}
        from ..io.tensor_bytes import dtype_code

        for key, t in self.tensors.items():
            m = _KEY.match(key)
            if m:
                groups.setdefault(m[1], {})[m[2]] = key
            else:
                full[key] = FullTensorInfo(key, dtype_code(t.dtype), tuple(t.shape))
        modules = {}
        for module, keys in sorted(groups.items()):
            found = self._module(module, keys)
            if found:
                modules[module] = found
        return AdapterInfo(
            path=self.path,
            format=NAME,
            files=(self.path,),
            modules=modules,
            full_tensors=full,
            findings=tuple(self.findings),
        )

    def _module(self, module: str, keys: dict[str, str]) -> ModuleInfo | None:
        from ..io.tensor_bytes import dtype_code

        if "A" not in keys or "B" not in keys:
            self.findings.append(error("missing-factor", "lora_A and lora_B must both be present", module))
            return None
        a, b = tuple(self.tensors[keys["A"]].shape), tuple(self.tensors[keys["B"]].shape)
        if len(a) != 2 or len(b) != 2 or b[1] == 0 or a[0] % b[1]:
            self.findings.append(error("rank-mismatch", f"lora_A is {list(a)} but lora_B is {list(b)}", module))
            return None
        groups, rank = a[0] // b[1], b[1]
        out = b[0]
        if groups > 1:
            enable = self._enable_lora(module, groups, a[1], b[0])
            if enable is None:
                return None
            self.merged[keys["B"]] = enable
            out = b[0] // groups * len(enable)
        embedding = bool(_EMBEDDING_LEAVES.search(module.rsplit(".", 1)[-1]))
        return ModuleInfo(
            kind="embedding" if embedding else "linear",
            rank=a[0],
            in_features=a[1],
            out_features=out,
            scale=self.alpha / rank,
            alpha=self.alpha * groups,
            scale_rule="alpha/r",
            fan_in_fan_out=not embedding and self.base.transposed(module, a[1], out),
            keys={"A": keys["A"], "B": keys["B"]},
            shapes={"A": a, "B": (out, a[0])},
            dtypes={r: dtype_code(self.tensors[k].dtype) for r, k in (("A", keys["A"]), ("B", keys["B"]))},
        )

    def _enable_lora(self, module: str, groups: int, in_features: int, rows: int) -> list[bool] | None:
        """MergedLinear's `enable_lora`, from the fused layer's width in the base."""
        width = self.base.out_features(module, in_features)
        if width is None:
            raise UsageError(
                f"module {module!r} is a loralib MergedLinear ({groups} LoRA groups in a fused layer): pass --base",
                path=self.path,
                hint="pass --base (the base checkpoint) so its fused layer's width tells the slices apart",
            )
        slices = width // (rows // groups) if rows % groups == 0 and width % (rows // groups) == 0 else 0
        if slices == groups:
            return [True] * groups
        if (slices, groups) == (3, 2):
            self.findings.append(
                warning(
                    "merged-assumed", "2 of 3 fused slices adapted: assumed q and v (enable_lora [T, F, T])", module
                )
            )
            return [True, False, True]
        self.findings.append(
            error("merged-layout", f"{groups} LoRA groups do not fit a fused width of {width}", module)
        )
        return None


class _Base:
    """What loralib needs from `--base`: weight shapes (MergedLinear widths, Conv1D layout)."""

    def __init__(self, base: Path | None) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.config: dict[str, Any] = {}
        if base is None:
            return
        from ..io.checkpoint import Checkpoint

        with Checkpoint(base) as ckpt:
            self.shapes = {n: tuple(ckpt.info(n).shape) for n in ckpt.names}
        self.config = read_config(base) or {}

    def out_features(self, module: str, in_features: int) -> int | None:
        shape = self.shapes.get(module + ".weight")
        if shape is None or len(shape) != 2 or in_features not in shape:
            return None
        return shape[1] if shape[0] == in_features and (shape[1] != in_features or self._conv1d()) else shape[0]

    def transposed(self, module: str, in_features: int, out: int) -> bool:
        """Whether the base stores this weight (in, out): GPT-2's Conv1D (`fan_in_fan_out`)."""
        shape = self.shapes.get(module + ".weight")
        if shape is None:
            return False
        return shape == (in_features, out) and (in_features != out or self._conv1d())

    def _conv1d(self) -> bool:
        return self.config.get("model_type") == "gpt2"


def _block_diagonal(b: torch.Tensor, enable: list[bool], total_rank: int) -> torch.Tensor:
    """loralib's grouped B (out/n·k, r) → the fused layer's B (out, r·k), zero rows where LoRA is disabled."""
    groups = sum(enable)
    rows, rank = b.shape[0] // groups, total_rank // groups
    full = b.new_zeros(rows * len(enable), total_rank)
    slots = [i for i, on in enumerate(enable) if on]
    for g, slot in enumerate(slots):
        full[slot * rows : (slot + 1) * rows, g * rank : (g + 1) * rank] = b[g * rows : (g + 1) * rows]
    return full
