"""The q/k row order of RoPE models: Hugging Face's halves vs Meta's interleaved pairs (FORMATS.md §5.3, §6).

HF checkpoints of Llama-family models store each head's q/k rows as two halves (the rotary
pairs are `i` and `i + head_dim/2`); Meta's checkpoints, torchtune and llama.cpp's GGUF keep
the pairs interleaved (`2i`, `2i+1`). A LoRA on q/k carries that order in the rows of B (and
of a DoRA magnitude), so converting between the two families permutes those rows, with the
head count of q (`num_attention_heads`) or k (`num_key_value_heads`). Only rows move: the
permutation is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, UsageError
from ..io.config_json import CONFIG_NAME, read_config
from ..io.values import positive_int

if TYPE_CHECKING:
    import torch


def hf_to_meta(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows in HF order → Meta order (llama.cpp's `LlamaModel.permute`); `rows` is (out, ...)."""
    out = rows.shape[0]
    _check(out, n_heads)
    return rows.reshape(n_heads, 2, out // n_heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def meta_to_hf(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows in Meta order → HF order (torchtune's `_permute_lora_matrix`); the inverse of `hf_to_meta`."""
    out = rows.shape[0]
    _check(out, n_heads)
    return rows.reshape(n_heads, out // n_heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


@dataclass(frozen=True)
class RopeHeads:
    """Head counts of q and k, from the base model's config.json."""

    n_heads: int
    n_kv_heads: int

    def heads_for(self, module: str) -> int | None:
        """Heads whose rows `module` permutes: q_proj → n_heads, k_proj → n_kv_heads, others None."""
        leaf = module.rsplit(".", 1)[-1]
        return {"q_proj": self.n_heads, "k_proj": self.n_kv_heads}.get(leaf)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RopeHeads:
        """Head counts of a config.json (a multimodal model's `text_config` when it has them)."""
        text = config.get("text_config")
        config = text if isinstance(text, dict) and "num_attention_heads" in text else config
        n_heads = config.get("num_attention_heads")
        if not isinstance(n_heads, int) or n_heads <= 0:
            raise FormatError("the base config.json has no num_attention_heads", hint="pass the base model directory")
        n_kv = config.get("num_key_value_heads") or n_heads
        return cls(n_heads, positive_int(n_kv, "num_key_value_heads"))


def is_rope_module(module: str) -> bool:
    """Whether `module` is a q or k projection (whose B rows depend on the RoPE row order)."""
    return module.rsplit(".", 1)[-1] in ("q_proj", "k_proj")


def base_config(base: Path | None) -> dict[str, Any] | None:
    """The base model's config.json (`base` is its directory or a file inside it); None without a base."""
    if base is None:
        return None
    config = read_config(base)
    if config is None:
        raise UsageError(f"no {CONFIG_NAME} in the base {base}", hint="pass the base model's directory as --base")
    return config


def _check(out: int, n_heads: int) -> None:
    if n_heads <= 0 or out % (2 * n_heads):
        raise FormatError(
            f"{out} rows do not split into {n_heads} heads of even size",
            hint="the base config's head counts do not match the adapter; check the base given",
        )
