"""llama.cpp judges loractl's GGUF LoRA files (issue 13 item 1).

llama.cpp's own `convert_lora_to_gguf.py` writes the reference file for a PEFT adapter, and
llama.cpp (llama-cpp-python) runs loractl's file on an F32 GGUF of the base made by its own
`convert_hf_to_gguf.py`; transformers + PEFT on the same tokens is the reference for logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import run_cli
from interop_models import logits, peft_adapter, rel, tokens
from oracles import oracle

pytestmark = pytest.mark.interop
MODELS = ("tiny-llama", "smollm2")


@pytest.fixture(scope="module")
def llama_cpp() -> Any:
    oracle("gguf", "gguf")
    return oracle("llama_cpp", "llama-cpp-python")


@pytest.fixture(scope="module")
def cases(
    llama_cpp: Any, smollm2: Path, smollm2_lora: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path, Any, Path]]:
    """Per base: (base dir, PEFT adapter made by PEFT, its PeftModel, llama.cpp converter's GGUF of it)."""
    from llama_cpp_tools import lora_ggufs

    tmp = tmp_path_factory.mktemp("llama-cpp")
    tiny = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"
    out = {
        "tiny-llama": (tiny, tmp / "tiny", peft_adapter(tiny, tmp / "tiny", r=3, alpha=5.0, seed=2)),
        "smollm2": (smollm2, *smollm2_lora),
    }
    lora_ggufs(*((adapter, base, tmp / f"{name}.gguf") for name, (base, adapter, _) in out.items()))
    return {name: (*case, tmp / f"{name}.gguf") for name, case in out.items()}


def _gguf_contents(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...], np.ndarray]]]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), np.array(t.data)) for t in reader.tensors}
    return fields, tensors


def _loractl_gguf(adapter: Path, base: Path, out: Path) -> Path:
    code, _, err = run_cli("convert", adapter, "--to", "gguf", "--base", base, "-o", out)
    assert code == 0, err
    return out


@pytest.mark.parametrize("model", MODELS)
def test_gguf_is_what_llama_cpp_converter_writes(model: str, cases: dict[str, Any], tmp_path: Path) -> None:
    base, adapter, _, reference = cases[model]
    ours_fields, ours = _gguf_contents(_loractl_gguf(adapter, base, tmp_path / "loractl.gguf"))
    ref_fields, ref = _gguf_contents(reference)

    for key in ("general.type", "adapter.type", "adapter.lora.alpha", "general.architecture"):
        assert ours_fields[key] == ref_fields[key], key
    assert ours.keys() == ref.keys()
    for name, (kind, shape, data) in ref.items():
        assert ours[name][:2] == (kind, shape), name
        np.testing.assert_array_equal(ours[name][2], data, err_msg=name)  # F32: only rows move, no rounding


def _llama_logits(llama_cpp: Any, model: Path, ids: list[int], lora: Path | None = None) -> torch.Tensor:
    """llama.cpp's logits with an F32 KV cache (its default F16 cache alone costs ~6e-4 relative)."""
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=str(model), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=64, verbose=False,
        type_k=f32, type_v=f32,
    )  # fmt: skip
    try:
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))
    finally:
        llm.close()


def test_llama_cpp_runs_loractl_gguf_like_peft(llama_cpp: Any, cases: dict[str, Any], tmp_path: Path) -> None:
    from llama_cpp_tools import base_gguf

    base, adapter, peft_model, _ = cases["smollm2"]
    ids = tokens(base)
    hf_base, hf_lora = logits(peft_model, ids, adapter=False), logits(peft_model, ids)
    gguf_base = base_gguf(base)
    ll_base = _llama_logits(llama_cpp, gguf_base, ids)
    ll_lora = _llama_logits(llama_cpp, gguf_base, ids, _loractl_gguf(adapter, base, tmp_path / "a.gguf"))

    base_error = rel(ll_base, hf_base)  # llama.cpp's own float32 arithmetic: ~2e-6
    assert base_error < 1e-4
    assert rel(hf_lora - hf_base, hf_base) > 0.02  # the adapter does something a dropped module would show
    assert rel(ll_lora, hf_lora) <= 2 * base_error  # both at float32 rounding: 2.4e-6 vs 1.7e-6 measured
    assert rel(ll_lora - ll_base, hf_lora - hf_base) < 1e-2  # measured ~5e-5


@pytest.mark.parametrize("model", MODELS)
def test_llama_cpp_converter_file_reads_back_to_peft_delta(model: str, cases: dict[str, Any], tmp_path: Path) -> None:
    """The reverse: llama.cpp's file (q/k rows in Meta order, no loractl records) → PEFT with PEFT's ΔW."""
    from loractl.formats import load_adapter

    base, _, peft_model, reference = cases[model]
    code, _, err = run_cli("convert", reference, "--to", "peft", "--base", base, "-o", tmp_path / "back")
    assert code == 0, err
    back = load_adapter(tmp_path / "back")
    expected = {
        name.removeprefix("base_model.model."): layer.get_delta_weight("default").double()
        for name, layer in peft_model.named_modules()
        if hasattr(layer, "get_delta_weight") and "default" in getattr(layer, "lora_A", {})
    }
    assert set(back.modules) == set(expected)
    for name, delta in expected.items():
        assert rel(back.modules[name].delta_weight(torch.float64), delta) < 1e-6, name


def test_llama_cpp_converter_shows_the_validate_target_rules(
    llama_cpp: Any, fixtures_dir: Path, tmp_path: Path
) -> None:
    """`validate --target llamacpp` rules, shown by llama.cpp's converter: it refuses DoRA (dora-dropped) and
    keeps one lora_alpha, so alpha_pattern/rsLoRA modules get another scale (per-module-alpha)."""
    from llama_cpp_tools import lora_ggufs

    from loractl.formats import load_adapter
    from loractl.formats.options import ReadOptions

    base, adapters = fixtures_dir / "tiny-llama", fixtures_dir / "adapters"
    with pytest.raises(AssertionError, match="Not a lora_A or lora_B tensor"):
        lora_ggufs((adapters / "tiny-dora", base, tmp_path / "dora.gguf"))
    lora_ggufs((adapters / "tiny-patterns", base, tmp_path / "patterns.gguf"))
    theirs = load_adapter(tmp_path / "patterns.gguf", options=ReadOptions(base=base))
    ours = load_adapter(adapters / "tiny-patterns")
    wrong = [n for n, m in ours.modules.items() if rel(theirs.modules[n].delta_weight(), m.delta_weight()) > 1e-3]
    assert wrong  # every module whose scale is not lora_alpha / r (here all, rsLoRA) is off
