"""llama.cpp judges loractl's GGUF LoRA files (issue 13 item 1).

llama.cpp's own `convert_lora_to_gguf.py` writes the reference file for a PEFT adapter, and
llama.cpp (llama-cpp-python) runs loractl's file on an F32 GGUF of the base made by its own
`convert_hf_to_gguf.py`; transformers + PEFT on the same tokens is the reference for logits.
"""

from __future__ import annotations

from dataclasses import replace
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
    from llama_cpp_tools import open_llama

    f32 = llama_cpp.GGML_TYPE_F32
    llm = open_llama(
        model, lora_path=str(lora) if lora else None, logits_all=True, n_ctx=64, verbose=False,
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


@pytest.fixture(scope="module")
def tiny_gguf(llama_cpp: Any, smollm2: Path) -> tuple[Path, Path]:
    """The 2-layer Llama with SmolLM2's vocabulary and its F32 GGUF by `convert_hf_to_gguf.py` (both cached)."""
    from llama_cpp_tools import base_gguf, tiny_llama

    model = tiny_llama(smollm2)
    return model, base_gguf(model)


_Q = "model.layers.0.self_attn.q_proj"
# What llama.cpp does with an adapter that has, next to a plain q_proj module, each thing a rule flags:
# (its module(s), what convert_lora_to_gguf.py says when it refuses, what llama.cpp says loading its GGUF).
_LLAMA_CPP_REFUSES: dict[str, tuple[dict[str, Any], str | None, str | None]] = {
    # Phi-3's fused name: the converter's name map knows it (attn_qkv), a Llama graph has no such tensor.
    "unknown-module": ({"model.layers.0.self_attn.qkv_proj": (192, 64)}, None, "does not exist in base model"),
    "conv-unsupported": ({"model.layers.0.mlp.down_proj": "conv"}, None, "has incorrect shape"),
    "bias-dropped": ({_Q: "bias"}, "Not a lora_A or lora_B tensor", None),
    "full-tensors-dropped": ({"lm_head.weight": "full"}, "Not a lora_A or lora_B tensor", None),
}


def _rule_adapter(extra: dict[str, Any]) -> Any:
    from helpers import random_module

    from loractl.adapter import Adapter, AdapterMeta, LoraModule

    g = torch.Generator().manual_seed(4)
    modules, full = {_Q: random_module(64, 64, 2, seed=1)}, {}
    for name, what in extra.items():
        if what == "conv":  # a 1×1 conv LoRA: 4-D factors
            modules[name] = LoraModule(A=torch.randn(2, 128, 1, 1, generator=g), B=torch.randn(64, 2, 1, 1, generator=g),
                                       scale=1.0, alpha=2.0, kind="conv")  # fmt: skip
        elif what == "bias":
            modules[name] = random_module(64, 64, 2, seed=1, bias=torch.randn(64, generator=g))
        elif what == "full":
            full[name] = (
                torch.randn(49152, 64, generator=g) if name == "lm_head.weight" else torch.randn(64, generator=g)
            )
        else:
            modules[name] = random_module(*what, 2, seed=2)
    return Adapter(modules=modules, full_tensors=full, meta=AdapterMeta())


@pytest.fixture(scope="module")
def converted(
    tiny_gguf: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path, str | None]]:
    """Per case: (PEFT adapter, where convert_lora_to_gguf.py wrote its GGUF, None or why it refused), all the
    cases in one converter interpreter: the rules above, DoRA, alpha_pattern/rsLoRA, a norm with and without."""
    from llama_cpp_tools import lora_gguf_outcomes

    from loractl.formats import save_adapter

    tmp = tmp_path_factory.mktemp("rules")
    normed = _rule_adapter({"model.norm.weight": "full"})
    adapters = {code: _rule_adapter(extra) for code, (extra, _, _) in _LLAMA_CPP_REFUSES.items()}
    adapters |= {"normed": normed, "plain": replace(normed, full_tensors={})}
    paths = {code: save_adapter(adapter, tmp / code, format="peft") for code, adapter in adapters.items()}
    shipped = Path(__file__).resolve().parent.parent / "fixtures" / "adapters"
    paths |= {name: shipped / f"tiny-{name}" for name in ("dora", "patterns")}
    outcomes = lora_gguf_outcomes(*((path, tiny_gguf[0], tmp / f"{code}.gguf") for code, path in paths.items()))
    return {
        code: (path, tmp / f"{code}.gguf", said) for (code, path), said in zip(paths.items(), outcomes, strict=True)
    }


def test_llama_cpp_converter_shows_the_validate_target_rules(
    converted: dict[str, tuple[Path, Path, str | None]], fixtures_dir: Path
) -> None:
    """`validate --target llamacpp` rules, shown by llama.cpp's converter: it refuses DoRA (dora-dropped) and
    keeps one lora_alpha, so alpha_pattern/rsLoRA modules get another scale (per-module-alpha)."""
    from loractl.formats import load_adapter
    from loractl.formats.options import ReadOptions

    assert "Not a lora_A or lora_B tensor" in (converted["dora"][2] or "")
    assert converted["patterns"][2] is None
    theirs = load_adapter(converted["patterns"][1], options=ReadOptions(base=fixtures_dir / "tiny-llama"))
    ours = load_adapter(fixtures_dir / "adapters" / "tiny-patterns")
    wrong = [n for n, m in ours.modules.items() if rel(theirs.modules[n].delta_weight(), m.delta_weight()) > 1e-3]
    assert wrong  # every module whose scale is not lora_alpha / r (here all, rsLoRA) is off


@pytest.mark.parametrize("code", _LLAMA_CPP_REFUSES)
def test_llama_cpp_refuses_what_validate_target_flags(
    code: str, converted: dict[str, tuple[Path, Path, str | None]], tiny_gguf: tuple[Path, Path]
) -> None:
    """convert_lora_to_gguf.py refuses the adapter, or writes a GGUF that llama.cpp refuses to load;
    `validate --target llamacpp --base` flags the same module with the rule's code."""
    from helpers import target_findings
    from llama_cpp_tools import lora_refusal

    extra, converter_says, loader_says = _LLAMA_CPP_REFUSES[code]
    adapter, gguf_file, said = converted[code]
    if converter_says is None:
        assert said is None, said
        assert loader_says in (lora_refusal(tiny_gguf[1], gguf_file) or "")
    else:
        assert said is not None and converter_says in said, said
    flagged = target_findings(adapter, "llamacpp", "--base", tiny_gguf[0])
    assert set(extra) - {"lm_head.weight"} <= set(flagged.get(code, ())), flagged
    assert code in flagged


def test_llama_cpp_skips_the_norms_a_gguf_lora_carries(
    converted: dict[str, tuple[Path, Path, str | None]], tiny_gguf: tuple[Path, Path]
) -> None:
    """convert_lora_to_gguf.py keeps a norm from modules_to_save (as mergekit writes them), but llama.cpp skips
    `*_norm.weight` at load ("TODO: add support for norm vector"): the logits are those of the file without it,
    so `validate --target llamacpp` flags the norm as dropped too."""
    import gguf
    from helpers import target_findings
    from llama_cpp_tools import logits as llama_logits

    (normed, normed_gguf, said), (_, plain_gguf, plain_said) = converted["normed"], converted["plain"]
    assert said is None and plain_said is None, (said, plain_said)
    assert "output_norm.weight" in {t.name for t in gguf.GGUFReader(normed_gguf).tensors}

    model, gguf_base = tiny_gguf
    ids = [1, 504, 2281, 9551, 28, 17]
    base, lora = llama_logits(gguf_base, ids), llama_logits(gguf_base, ids, plain_gguf)
    assert np.linalg.norm(lora - base) > 1e-3 * np.linalg.norm(base)  # the LoRA part does act
    np.testing.assert_array_equal(llama_logits(gguf_base, ids, normed_gguf), lora)  # the norm does not
    assert "full-tensors-dropped" in target_findings(normed, "llamacpp", "--base", model)
