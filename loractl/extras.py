"""Optional dependencies: which pip extra carries which package, checked before a command needs one.

A missing package is named with the extra that installs it before the work starts, instead of
surfacing as a third-party error deep inside a load (transformers mentions `accelerate` only when
it places the weights, as a `ValueError` that looked like a bad base). `tests/test_extras.py`
checks that pyproject.toml's extras carry every package listed here.
"""

from __future__ import annotations

from importlib.util import find_spec

from .errors import UsageError

# Import names, which for these packages are also their distribution names.
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("transformers", "tokenizers", "accelerate"),
    "qlora": ("transformers", "tokenizers", "accelerate", "bitsandbytes"),
    "gguf": ("gguf",),
    "plot": ("matplotlib",),
    "data": ("datasets",),
    "logging": ("tensorboard", "wandb"),
}


def require_extra(extra: str, *, purpose: str) -> None:
    """Raise `UsageError` naming every package of `extra` that is not installed, for `purpose` (a command or flag)."""
    missing = [package for package in EXTRAS[extra] if find_spec(package) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UsageError(
            f"{purpose} needs {', '.join(missing)}, which {verb} not installed", hint=f"pip install 'loractl[{extra}]'"
        )
