"""What a reader or writer may need besides the path: one frozen value passed to every format.

Every format module offers the same verbs with the same signatures:

    detect(path: Path) -> bool
    describe(path: Path, options: ReadOptions) -> AdapterInfo     (headers and config only)
    read(path: Path, options: ReadOptions) -> Adapter
    write(adapter: Adapter, path: Path, *, force: bool, options: WriteOptions) -> Path
    HOLDS: frozenset[Feature]                                      (what the format can store)
    FILLS: frozenset[str]        ("alpha", "scale": what the format may lack and take from the options)

A format ignores the options it does not need; an option a format needs but did not get
(loralib's alpha, an old mlx `.npz`'s scale) is a `UsageError` that names the flag. `alpha` and
`scale` only fill what a file lacks: given for a file that records its own (another value), or for
a format that always records it, they are refused (`filled`, and the registry), never applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UsageError

Feature = Literal[
    "module_scale",  # a scale per module (else folded into B against one global scale: exact)
    "module_rank",  # a rank per module (else zero-padded to the largest: exact)
    "rslora",  # the alpha/√r notation (else folded into alpha or scale: exact)
    "dora",  # DoRA magnitudes
    "bias",  # lora_B.bias
    "full_tensors",  # modules_to_save, heads, base_layer weights
    "embedding",  # LoRA on embeddings
    "conv",  # LoRA on convolutions
    "fan_in_fan_out",  # the GPT-2 Conv1D flag (affects how a merge lays out ΔW)
]
ALL_FEATURES: frozenset[Feature] = frozenset(Feature.__args__)  # type: ignore[attr-defined]
# Features a writer folds exactly when it lacks them; missing any other feature loses data.
FOLDABLE: frozenset[Feature] = frozenset({"module_scale", "module_rank", "rslora"})


@dataclass(frozen=True)
class ReadOptions:
    """Inputs some readers need.

    Attributes:
        allow_pickle: load torch pickles (with `weights_only=True`).
        base: the base checkpoint (file or directory): its tensor names resolve kohya's flattened
            names, its config.json gives head counts (GGUF, torchtune) and layer counts.
        alpha: the alpha of formats that do not store it (loralib).
        scale: the scale of formats that do not store it (old mlx-examples `.npz`).
    """

    allow_pickle: bool = False
    base: Path | None = None
    alpha: float | None = None
    scale: float | None = None


@dataclass(frozen=True)
class WriteOptions:
    """Inputs some writers need.

    Attributes:
        base: the base checkpoint, as for `ReadOptions` (GGUF/torchtune head counts, mlx num_layers).
        alpha: the one global alpha of single-alpha formats (GGUF, loralib, torchtune); per-module
            scales are folded into B against it. None: the writer picks the most common one.
    """

    base: Path | None = None
    alpha: float | None = None


def filled(given: float | None, recorded: object, flag: str, path: Path) -> object:
    """The value the file records; `given` (`--alpha`, `--scale`) only where it records none.

    Raises:
        UsageError: the file records another value than `given`.
    """
    if given is None or recorded is None:
        return given if recorded is None else recorded
    if not isinstance(recorded, (int, float)) or isinstance(recorded, bool) or float(recorded) != float(given):
        raise UsageError(f"{flag} {given:g} contradicts the {flag[2:]} {recorded} this file records", path=path,
                         hint=f"{flag} fills only what a file lacks: drop it, or give it for another input only "
                         f"as {flag} PATH={given:g}")  # fmt: skip
    return recorded
