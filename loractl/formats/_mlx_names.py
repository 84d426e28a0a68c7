"""mlx-lm's module paths where they differ from transformers' (loractl's canonical names).

Most mlx-lm models keep transformers' paths (`model.layers.N.self_attn.q_proj`). Two families that
loractl reads and writes do not (mlx_lm/models/gpt2.py, gpt_neox.py, mlx-lm 0.32):

    GPT-2     transformer.h.N.attn.c_attn   ↔  model.h.N.attn.c_attn     (transformer.wte ↔ model.wte)
    GPT-NeoX  gpt_neox.layers.N.attention…  ↔  model.h.N.attention…      (gpt_neox.embed_in ↔ model.embed_in)

mlx-lm's GPT-2 stores its Conv1D weights transposed into Linear layout, so an mlx GPT-2 module is
a transformers Conv1D one: it reads back with `fan_in_fan_out`. GPT-BigCode keeps `transformer.h.N`
in mlx-lm with the same leaf names as GPT-2, so a `transformer.h.N` adapter is GPT-2's only when
its Conv1D flag or the base's `model_type` says so; otherwise it is ambiguous and refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import AdapterError
from ..io.config_json import read_config

_GPT2_BLOCK = r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$"  # GPT-2's Conv1D layers
_GPT2_MLX = re.compile(rf"^model\.({_GPT2_BLOCK}|wte$|wpe$)")
_NEOX_MLX = re.compile(r"^model\.(h\.\d+\.(attention\.|mlp\.dense_)|embed_in$|embed_out$)")
_GPT2_HF = re.compile(rf"^transformer\.({_GPT2_BLOCK}|wte$|wpe$)")
_NEOX_HF = re.compile(r"^(gpt_neox\.(layers\.\d+\.(attention\.|mlp\.dense_)|embed_in$)|embed_out$)")


def is_gpt2_conv1d(module: str) -> bool:
    """A transformers GPT-2 Conv1D module (`transformer.h.N.attn.c_attn`, ...), which mlx-lm holds as a Linear."""
    return bool(_GPT2_HF.match(module)) and not module.endswith(("wte", "wpe"))


def from_mlx(module: str) -> tuple[str, bool]:
    """The transformers name of an mlx-lm module, and whether it is a Conv1D (GPT-2) one."""
    if _GPT2_MLX.match(module):
        return "transformer." + module[len("model.") :], not module.endswith(("wte", "wpe"))
    if _NEOX_MLX.match(module):
        rest = module[len("model.") :]
        return (rest, False) if rest == "embed_out" else ("gpt_neox." + re.sub(r"^h\.", "layers.", rest), False)
    return module, False


def to_mlx(module: str, conv1d: bool, model_type: str | None) -> str:
    """The mlx-lm name of a transformers module.

    Raises:
        AdapterError: a `transformer.h.N` module of unknown family (GPT-2 and GPT-BigCode name it differently).
    """
    if _GPT2_HF.match(module):
        if conv1d or model_type == "gpt2":
            return "model." + module[len("transformer.") :]
        if model_type is None:
            raise AdapterError(
                f"module {module!r}: mlx-lm names it model.h.N… for GPT-2 but transformer.h.N… for GPT-BigCode, "
                "and nothing says which model this is",
                hint="pass --base (the model's directory): its config.json's model_type decides",
            )
        return module
    if _NEOX_HF.match(module):
        rest = module.removeprefix("gpt_neox.")
        return "model." + re.sub(r"^layers\.", "h.", rest)
    return module


def model_type(base: Path | None) -> str | None:
    """The base's `model_type` (config.json), if a base with a config was given."""
    if base is None:
        return None
    doc = read_config(base)
    value = doc.get("model_type") if doc else None
    return value if isinstance(value, str) else None
