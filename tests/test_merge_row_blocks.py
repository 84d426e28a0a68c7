"""A rewritten base (GGUF, SD single file, FP8, bitsandbytes) is merged a block of rows at a time: the bytes
written are those of a merge of each tensor in one block, and so are the report's figures (issue 24's memory goal).

Each base is merged twice: with the usual block size (these tiny tensors: one block each) and with
blocks of a few rows (`merge_kernel.BLOCK_ELEMENTS` and `merge_placed.BLOCK` lowered), which must write the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import loractl.ops.merge_kernel as kernel
import loractl.ops.merge_placed as placed
from loractl.ops.merge import merge
from tests.helpers import save

pytestmark = pytest.mark.usefixtures("one_thread")


def _files(out: Path) -> dict[str, bytes]:
    if out.is_file():
        return {"": out.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _both(base: Path, lora: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch, name: str, **kw: Any) -> None:
    """The merge of `lora` into `base` in whole tensors and in small row blocks: the same bytes, the same figures."""
    whole = merge(base, [lora], tmp / f"whole{name}", **kw)
    calls: list[int] = []
    real = kernel.merge_rows

    def counted(block: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(block.shape[0]))
        return real(block, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(kernel, "BLOCK_ELEMENTS", 2048)
        m.setattr(placed, "BLOCK", 2048)
        m.setattr(kernel, "merge_rows", counted)
        blocks = merge(base, [lora], tmp / f"blocks{name}", **kw)
    assert len(calls) > 2 * len(whole.modules) // 3 + 1, calls  # several blocks per tensor, not one each
    assert min(calls) >= kernel.MIN_ROWS
    assert _files(tmp / f"whole{name}") == _files(tmp / f"blocks{name}")
    for a, b in zip(whole.modules, blocks.modules, strict=True):
        assert a.module == b.module
        for field in ("relative_delta", "rounding_loss", "rounding_error"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-6, abs=1e-12)), field


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q5_1"])
def test_gguf_row_blocks_write_the_whole_tensor_merge(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gguf")
    from tests.test_merge_gguf import adapter, tiny_gguf

    base = tiny_gguf(tmp_path / "base.gguf", kind)
    _both(base, save(adapter(), tmp_path / "lora"), tmp_path, monkeypatch, ".gguf")


def test_fp8_row_blocks_keep_the_128_row_scale_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    from tests.test_bases_fp8 import adapter, fp8_checkpoint

    base = fp8_checkpoint(tmp_path / "base", 320)
    lora = save(adapter(320), tmp_path / "lora")
    _both(base, lora, tmp_path, monkeypatch, "")
    _both(base, lora, tmp_path, monkeypatch, "-bf16", dtype="bfloat16")


@pytest.mark.parametrize("kind", ["nf4-double", "int8"])
def test_bnb_row_blocks_dequantize_as_the_whole_weight(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from tests.test_bases_bnb import ADAPTER, QUANT, TINY

    model = transformers.AutoModelForCausalLM.from_pretrained(
        TINY, quantization_config=transformers.BitsAndBytesConfig(**QUANT[kind]), device_map="cpu"
    )
    model.save_pretrained(tmp_path / "base")
    _both(tmp_path / "base", ADAPTER, tmp_path, monkeypatch, "")
    if kind == "int8":
        _both(tmp_path / "base", ADAPTER, tmp_path, monkeypatch, "-keep", keep_quant=True)


def test_sd_single_file_row_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("diffusers")
    from tests.sd_pipelines import tiny_sd
    from tests.test_sd_single_file import _lora

    (tmp_path / "sd").mkdir()
    sd = tiny_sd("sd1", tmp_path / "sd")
    lora = save(_lora(sd), tmp_path / "lora")
    _both(sd.single_file, lora, tmp_path, monkeypatch, ".safetensors")


@pytest.mark.parametrize("kind", ["F32", "BF16"])
def test_gguf_fingerprint_in_blocks_is_the_whole_tensors(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base fingerprint of a float GGUF hashes q/k rows put back in Hugging Face's order a block of whole
    heads at a time: the same digest as hashing each tensor whole."""
    pytest.importorskip("gguf")
    import loractl.bases.gguf as gguf_base
    from loractl.io import checkpoint
    from tests.test_merge_gguf import ADAPTED, tiny_gguf

    base = gguf_base.GgufBase(tiny_gguf(tmp_path / "base.gguf", kind))
    modules = list(ADAPTED)
    assert any(base.heads and "q_proj" in m for m in modules)
    whole = base.fingerprint(modules, fresh=True)
    monkeypatch.setattr(checkpoint, "HASH_BLOCK", 1)  # a head (or a row) per block
    assert base.fingerprint(modules, fresh=True) == whole


def test_sd_fingerprint_in_blocks_is_the_whole_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single file's base fingerprint (fused q/k/v row ranges included) hashes a few rows at a time: the same
    digest as hashing each tensor whole."""
    pytest.importorskip("diffusers")
    from loractl.bases.sd_single_file import SingleFileBase
    from loractl.io import checkpoint
    from tests.sd_pipelines import tiny_sd
    from tests.test_sd_single_file import _lora

    (tmp_path / "sd").mkdir()
    sd = tiny_sd("sd1", tmp_path / "sd")
    base = SingleFileBase(sd.single_file)
    modules = list(_lora(sd).modules)
    whole = base.fingerprint(modules, fresh=True)
    assert whole
    monkeypatch.setattr(checkpoint, "HASH_BLOCK", 1)  # a row per block
    assert base.fingerprint(modules, fresh=True) == whole


def test_a_non_finite_block_writes_nothing(tmp_path: Path) -> None:
    """An update that makes some rows Inf stops the merge before the base stores them: no output file."""
    pytest.importorskip("gguf")
    from dataclasses import replace

    from loractl.errors import NumericError
    from tests.test_merge_gguf import adapter, tiny_gguf

    a = adapter()
    name, m = next(iter(a.modules.items()))
    b = m.B.clone()
    b[-1, 0] = float("inf")
    broken = replace(a, modules={**a.modules, name: replace(m, B=b)})
    base = tiny_gguf(tmp_path / "base.gguf", "Q8_0")
    with pytest.raises(NumericError, match="contains NaN or Inf"):
        merge(base, [save(broken, tmp_path / "lora")], tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def _flux_single_file(tmp: Path) -> Path:
    """A tiny Flux.1 transformer as the original single file (BFL's names), in bf16: its merged tensors round."""
    diffusers = pytest.importorskip("diffusers")
    from loractl.io.safetensors_writer import save_tensors
    from tests.test_merge_dit import _model, _original_state

    state = _original_state({k: v.detach().clone() for k, v in _model(diffusers).state_dict().items()})
    save_tensors(tmp / "flux1-tiny.safetensors", {k: v.to(torch.bfloat16) for k, v in state.items()})
    return tmp / "flux1-tiny.safetensors"


def test_dit_single_file_row_blocks_read_and_store_on_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single-file Flux base is read, merged and stored on the pool threads, several blocks at once (`into`):
    the bytes and figures of the whole-tensor merge, and a figure taken by hand: ‖stored − (W + ΔW)‖ / ‖ΔW‖."""
    from loractl.formats import save_adapter
    from loractl.io.checkpoint import Checkpoint
    from tests.test_merge_dit import _adapter

    base = _flux_single_file(tmp_path)
    adapter = _adapter()
    lora = save_adapter(adapter, tmp_path / "lora.safetensors", format="kohya")
    _both(base, lora, tmp_path, monkeypatch, ".safetensors")
    report = merge(base, [lora], tmp_path / "again.safetensors")
    key = "single_blocks.0.linear1"
    module = adapter.modules[f"transformer.{key}"]
    with Checkpoint(base) as before, Checkpoint(tmp_path / "again.safetensors") as after:
        w, stored = before.get(f"{key}.weight").double(), after.get(f"{key}.weight").double()
    merged = w + module.scale * (module.B.double() @ module.A.double())
    want = float((stored - merged).norm() / (merged - w).norm())
    got = next(m for m in report.modules if m.module == f"transformer.{key}")
    assert want > 1e-3  # bf16 rounds a visible share of ΔW away
    assert got.rounding_error == pytest.approx(want, rel=1e-3)
    assert got.rounding_loss == pytest.approx(want, rel=1e-3)


def test_dit_fingerprint_in_blocks_is_the_whole_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single Flux file's fingerprint (fused q/k/v and linear1 row ranges, the final AdaLN's halves exchanged)
    hashes a few rows at a time: the digest of each weight in diffusers' terms hashed whole."""
    from loractl.bases.dit import DitBase
    from loractl.io import checkpoint
    from tests.test_merge_dit import _adapter

    base = DitBase(_flux_single_file(tmp_path))
    modules = [*_adapter().modules, "transformer.norm_out.linear"]
    sources = base.canonical(modules)
    assert any(s.swap for _, s in sources) and any(s.rows for _, s in sources)
    whole = checkpoint.fingerprint_of(
        (n, base.ckpt.info(s.key).dtype, s.shape, lambda s=s: base.tensor(s).contiguous().view(-1).view(torch.uint8)
         .numpy().tobytes()) for n, s in sources
    )  # fmt: skip
    monkeypatch.setattr(checkpoint, "HASH_BLOCK", 1)  # a row per chunk
    assert base.fingerprint(modules, fresh=True) == whole


def test_a_non_finite_block_of_a_single_file_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inf in some rows of one tensor, with many blocks in flight on the pool: the merge stops with the error
    (no job left waiting for a write buffer), and no output file is left."""
    from dataclasses import replace

    from loractl.errors import NumericError
    from loractl.formats import save_adapter
    from tests.test_merge_dit import _adapter

    a = _adapter()
    name = "transformer.single_blocks.1.linear1"
    b = a.modules[name].B.clone()
    b[-5, 0] = float("inf")
    broken = replace(a, modules={**a.modules, name: replace(a.modules[name], B=b)})
    lora = save_adapter(broken, tmp_path / "lora.safetensors", format="kohya")
    monkeypatch.setattr(kernel, "BLOCK_ELEMENTS", 256)
    monkeypatch.setattr(placed, "BLOCK", 256)  # 8 rows a block: many blocks of each tensor in flight
    with pytest.raises(NumericError, match=r"'single_blocks\.1\.linear1\.weight' contains NaN or Inf"):
        merge(_flux_single_file(tmp_path), [lora], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
