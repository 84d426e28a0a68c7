"""A llama.cpp GGUF *model* file as a merge base: its tensors, their types, and where each module lands.

Module paths map to GGUF names with gguf-py's own name map (`names`), as for GGUF adapters;
q/k weights of Llama-family architectures hold their rows in Meta's RoPE order (`rope.py`), so a
ΔW is permuted the way llama.cpp's converter permuted the base. A tensor is rewritten in its own
type: gguf-py must both dequantize and quantize it (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, … —
probed, not listed, so a newer gguf-py widens the set by itself).
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import FormatError
from ...findings import Finding, error
from .._placement import Placement
from .._rope import RopeHeads, is_rope_module
from . import names as gguf_names

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import ReaderTensor

    from ...info import ModuleInfo


def is_gguf_model(path: str | Path) -> bool:
    """A file with the GGUF magic (model or adapter: `GgufBase` refuses adapters with a hint)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


class GgufBase:
    """The parsed header of a GGUF model file; tensor data is read one tensor at a time (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        gguf = gguf_names.require_gguf()
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
            fields = {
                k: f.contents() for k, f in self.reader.fields.items() if not k.startswith(("GGUF.", "tokenizer."))
            }
        except Exception as e:  # gguf-py parsing a hostile file: any failure is the file's
            raise FormatError(f"not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})", path=path) from None
        if fields.get("general.type", "model") != "model":
            raise FormatError(
                f"GGUF file of type {fields['general.type']!r}, not a model",
                path=path,
                hint="merge bases are GGUF models; a GGUF LoRA adapter goes after the base, as ADAPTER",
            )
        self.fields = fields
        self.arch = str(fields.get("general.architecture", ""))
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in self.reader.tensors}
        self.tmap = gguf_names.name_map(self.arch, self.block_count)
        self.heads = self._heads()

    @property
    def block_count(self) -> int:
        return int(self.fields.get(f"{self.arch}.block_count") or 1)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape in numpy (row-major) order, as Hugging Face stores the weight."""
        return tuple(int(n) for n in reversed(self.tensors[key].shape))

    def type_name(self, key: str) -> str:
        return str(self.tensors[key].tensor_type.name)

    def config(self) -> dict[str, Any]:
        """The head and layer counts as a Hugging Face config.json has them (for reading GGUF adapters)."""
        out: dict[str, Any] = {"num_hidden_layers": self.block_count}
        if self.heads:
            out |= {"num_attention_heads": self.heads.n_heads, "num_key_value_heads": self.heads.n_kv_heads}
        return out

    def write_config(self, directory: Path) -> Path:
        """`config()` as directory/config.json: what `ReadOptions.base` of a GGUF adapter needs."""
        (directory / "config.json").write_text(json.dumps(self.config()))
        return directory

    def place(self, module: str, m: ModuleInfo, adapter_arch: str | None) -> Placement | Finding:
        """The tensor `module` updates, or why it has none."""
        if adapter_arch and adapter_arch != self.arch:
            return error(
                "base-architecture", f"a {adapter_arch} adapter cannot merge into this {self.arch} model", module
            )
        stem = gguf_names.to_gguf(self.tmap, module)
        key = f"{stem}.weight"
        if stem is None or key not in self.tensors:
            tied = " (this GGUF ties the output head to token_embd)" if stem == "output" else ""
            return error("not-in-base", f"no tensor of this {self.arch} GGUF for the module{tied}", module)
        kind = self.type_name(key)
        if not writable(kind):
            return error(
                "base-type",
                f"{key} is {kind}, which gguf-py cannot quantize back (it can: {', '.join(writable_types())})",
                module,
            )
        heads = self.heads.heads_for(module) if self.heads and is_rope_module(module) else None
        return Placement(key, rope_heads=heads)

    def read_float32(self, key: str) -> torch.Tensor:
        """The tensor dequantized to float32, in numpy order."""
        import numpy as np
        import torch

        gguf = gguf_names.require_gguf()
        t = self.tensors[key]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(
            np.array(values, dtype=np.float32).reshape(self.shape(key))
        )  # a copy: the map is read-only

    def encode(self, key: str, values: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """`values` in the tensor's own type: the bytes to store, and what they dequantize to."""
        import numpy as np
        import torch

        gguf = gguf_names.require_gguf()
        t = self.tensors[key]
        data = gguf.quants.quantize(values.numpy(), t.tensor_type)
        raw = np.ascontiguousarray(data).tobytes()
        if len(raw) != int(t.n_bytes):
            raise FormatError(f"internal: {key} requantized to {len(raw)} bytes, not {t.n_bytes}", path=self.path)
        back = gguf.quants.dequantize(np.frombuffer(raw, dtype=t.data.dtype).reshape(t.data.shape), t.tensor_type)
        return raw, torch.from_numpy(np.array(back, dtype=np.float32).reshape(values.shape))

    def offset(self, key: str) -> int:
        """Where the tensor's bytes start in the file."""
        return int(self.tensors[key].data_offset)

    def _heads(self) -> RopeHeads | None:
        if self.arch not in gguf_names.PERMUTED_ARCHS:
            return None
        n = self.fields.get(f"{self.arch}.attention.head_count")
        kv = self.fields.get(f"{self.arch}.attention.head_count_kv") or n
        if not isinstance(n, int) or not isinstance(kv, int):
            raise FormatError(
                f"{self.arch} GGUF without integer {self.arch}.attention.head_count(_kv)",
                path=self.path,
                hint="llama.cpp's q/k row order cannot be matched without the head counts",
            )
        return RopeHeads(n, kv)


def adapter_architecture(info_config: dict[str, Any], fmt: str) -> str | None:
    """The architecture a GGUF adapter was written for (other formats do not say)."""
    arch = info_config.get("general.architecture") if fmt == "gguf" else None
    return arch if isinstance(arch, str) and arch else None


@cache
def writable(kind: str) -> bool:
    """Whether gguf-py can quantize to and dequantize from the type named `kind` (tried on one block)."""
    import numpy as np

    gguf = gguf_names.require_gguf()
    qtype = gguf.GGMLQuantizationType[kind]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    sample: np.ndarray[Any, Any] = np.linspace(-1, 1, math.lcm(block, 256), dtype=np.float32).reshape(1, -1)
    try:
        gguf.quants.dequantize(gguf.quants.quantize(sample, qtype), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def writable_types() -> list[str]:
    gguf = gguf_names.require_gguf()
    return [t.name for t in gguf.GGMLQuantizationType if writable(t.name)]
