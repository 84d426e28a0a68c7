"""Builders for tests: random canonical adapters and tiny base checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.formats import save_adapter
from loractl.io.checkpoint import Checkpoint
from loractl.io.safetensors_writer import save_tensors


def random_module(
    out: int,
    inp: int,
    rank: int,
    *,
    alpha: float | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **kw: object,
) -> LoraModule:
    """A module with random non-zero A and B; scale alpha/r (alpha defaults to 2r)."""
    g = torch.Generator().manual_seed(seed)
    alpha = float(2 * rank) if alpha is None else alpha
    return LoraModule(
        A=torch.randn(rank, inp, generator=g).to(dtype),
        B=torch.randn(out, rank, generator=g).to(dtype),
        scale=alpha / rank,
        alpha=alpha,
        **kw,  # type: ignore[arg-type]
    )


def tiny_base(
    path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    """A single-file base checkpoint with random weights of the given names and shapes."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / "model.safetensors", {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()})
    return path


def qv_adapter(layers: int = 2, hidden: int = 16, rank: int = 4) -> Adapter:
    """A q/v adapter for a base of `layers` layers with hidden size `hidden`."""
    modules = {
        f"model.layers.{i}.self_attn.{p}": random_module(hidden, hidden, rank, seed=10 * i + j)
        for i in range(layers)
        for j, p in enumerate(("q_proj", "v_proj"))
    }
    return Adapter(modules=modules, meta=AdapterMeta(base_model="tiny"))


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    """Run `loractl` through `main` (which renders errors) under CliRunner's isolation: (code, stdout, stderr)."""
    import sys

    from click.testing import CliRunner

    from loractl.cli import main

    with CliRunner().isolation() as (out, err, _):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        sys.stdout.flush()
        sys.stderr.flush()
        return code, out.getvalue().decode(), err.getvalue().decode()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint or adapter file, by name."""
    with Checkpoint(path) as ckpt:
        return {n: ckpt.get(n) for n in ckpt.names}


def raw(path: Path) -> dict[str, bytes]:
    """Every tensor's stored bytes, by name."""
    with Checkpoint(path) as ckpt:
        return {n: ckpt.raw_bytes(n) for n in ckpt.names}


def save(adapter: Adapter, path: Path) -> Path:
    save_adapter(adapter, path)
    return path


def target_findings(path: Path, target: str, *options: str | Path) -> dict[str, list[str | None]]:
    """`loractl validate PATH --target TARGET --json`: the modules of each finding, by code."""
    import json

    _, out, _ = run_cli("validate", path, "--target", target, "--json", *options)
    found: dict[str, list[str | None]] = {}
    for f in json.loads(out)["reports"][0]["findings"]:
        found.setdefault(f["code"], []).append(f["module"])
    return found


def add_delta_by_hand(model: torch.nn.Module, adapter: Adapter, weight: float = 1.0) -> None:
    """A diffusers transformer with `weight` · loractl's ΔW (in diffusers' layout) added to each weight, in place:
    the reference every diffusion-transformer interop and merge test compares diffusers against."""
    from loractl.formats import in_layout

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in in_layout(adapter, "diffusers").modules.items():
            params[name.removeprefix("transformer.") + ".weight"] += weight * m.delta_weight()
