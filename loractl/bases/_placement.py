"""Where an adapter module lands in a base stored in another layout (a GGUF model, a single-file SD checkpoint).

Each base's `place` (`gguf.py`, `sd_single_file.py`, `safetensors_dir.py`, `dit.py`) answers with a `Placement`
(several, where one fused module lands on the split tensors of a diffusers transformer: one `part` each);
the plan of the merge and its arithmetic live in `ops/merge_placed_plan.py`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """The stored tensor a module's ΔW adds to, and how it is laid out there."""

    key: str  # the tensor's name in the base file
    rows: tuple[int, int] | None = None  # ΔW fills only these rows (a fused q/k/v projection)
    transposed: bool = False  # the base stores the weight transposed
    rope_heads: int | None = None  # rows are in Meta's RoPE order for this many heads (llama.cpp q/k)
    swap_halves: bool = False  # ΔW's two row halves are exchanged (a DiT's final AdaLN: shift/scale order)
    part: tuple[int, int] | None = None  # only these rows of ΔW land here (a fused module over split tensors)
