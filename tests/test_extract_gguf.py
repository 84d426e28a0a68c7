"""Issue 23 item 3: extract reads its two checkpoints through `bases/`: GGUF models (any mix with a
Hugging Face checkpoint), single-file SD pairs, and fingerprints remembered for a second run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from llama_adapters import HEADS, HIDDEN, INTERMEDIATE, KV, KV_HEADS, VOCAB, llama_cpp_permute, write_gguf_model

import loractl
from loractl.bases import open_base
from loractl.errors import ShapeMismatchError
from loractl.formats import save_adapter
from loractl.formats.options import WriteOptions
from loractl.io.checkpoint import Checkpoint, FingerprintViews, touched_weight_names
from loractl.io.safetensors_writer import save_tensors
from loractl.ops import extract as extract_ops
from loractl.ops.extract import ExtractConfig, extract_adapter
from tests.helpers import random_module, run_cli

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

LAYER = {  # Hugging Face leaf → (GGUF leaf, shape)
    "input_layernorm": ("attn_norm", (HIDDEN,)),
    "self_attn.q_proj": ("attn_q", (HIDDEN, HIDDEN)),
    "self_attn.k_proj": ("attn_k", (KV, HIDDEN)),
    "self_attn.v_proj": ("attn_v", (KV, HIDDEN)),
    "self_attn.o_proj": ("attn_output", (HIDDEN, HIDDEN)),
    "post_attention_layernorm": ("ffn_norm", (HIDDEN,)),
    "mlp.gate_proj": ("ffn_gate", (INTERMEDIATE, HIDDEN)),
    "mlp.up_proj": ("ffn_up", (INTERMEDIATE, HIDDEN)),
    "mlp.down_proj": ("ffn_down", (HIDDEN, INTERMEDIATE)),
}
NAMES = {  # Hugging Face tensor name → (GGUF tensor name, shape), written out by hand (the reference)
    "model.embed_tokens.weight": ("token_embd.weight", (VOCAB, HIDDEN)),
    "model.norm.weight": ("output_norm.weight", (HIDDEN,)),
    "lm_head.weight": ("output.weight", (VOCAB, HIDDEN)),
}
NAMES |= {
    f"model.layers.{i}.{hf}.weight": (f"blk.{i}.{g}.weight", shape)
    for i in range(2)
    for hf, (g, shape) in LAYER.items()
}
CHANGED = {  # module → the rank of its ΔW (q/k: rows permuted by llama.cpp in the GGUF)
    "model.layers.0.self_attn.q_proj": 4,
    "model.layers.0.self_attn.k_proj": 2,
    "model.layers.1.self_attn.v_proj": 3,
    "model.layers.1.mlp.down_proj": 4,
}
RANK = 4


def hf_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base and a fine-tune = base + a known low-rank ΔW per changed module (+ a changed final norm)."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(shape, generator=g) * 0.1 for n, (_, shape) in NAMES.items()}
    ft = dict(base)
    for i, (module, r) in enumerate(CHANGED.items()):
        out, inp = NAMES[f"{module}.weight"][1]
        ft[f"{module}.weight"] = base[f"{module}.weight"] + random_module(out, inp, r, seed=i).delta_weight() * 0.05
    ft["model.norm.weight"] = base["model.norm.weight"] + 0.5
    return base, ft


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], kind: str) -> Path:
    """The tensors as llama.cpp's converter lays them out: GGUF names, q/k rows permuted, 2-D weights in `kind`,
    and Llama 3's `rope_freqs`, which the converter computes from the config (no checkpoint has it)."""
    tensors_out = [("rope_freqs.weight", np.linspace(1, 8, HIDDEN // HEADS // 2, dtype=np.float32), "F32")]
    for hf, (name, _) in NAMES.items():
        t = tensors[hf]
        if ".q_proj." in hf or ".k_proj." in hf:
            t = llama_cpp_permute(t, HEADS, KV_HEADS if ".k_proj." in hf else HEADS)
        tensors_out.append((name, t.float().numpy(), kind if t.dim() == 2 else "F32"))
    return write_gguf_model(path, tensors_out)


def write_dir(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Path:
    path.mkdir()
    save_tensors(path / "model.safetensors", {n: t.to(dtype) for n, t in tensors.items()})
    return path


def stored_hf(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """What the GGUF file holds, dequantized in float64 and put back in Hugging Face's names and row order."""
    inverse = {g: hf for hf, (g, _) in NAMES.items()}
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.name == "rope_freqs.weight":
            continue
        hf = inverse[t.name]
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64))
        values = values.reshape(NAMES[hf][1])
        if ".q_proj." in hf or ".k_proj." in hf:  # undo the permutation: find each stored row's origin
            heads = KV_HEADS if ".k_proj." in hf else HEADS
            order = llama_cpp_permute(torch.arange(values.shape[0]).double().unsqueeze(1), HEADS, heads).long()
            values = values[order.argsort(dim=0).squeeze(1)]
        out[hf] = values
    return out


def svd_reference(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0"])
def test_gguf_pair_matches_a_dense_float64_svd(kind: str, tmp_path: Path) -> None:
    """ΔW as the two GGUF files store it (q/k rows back in Hugging Face's order), cut to the rank, in float64."""
    w0, w1 = hf_pair()
    base, ft = write_gguf(tmp_path / "base.gguf", w0, kind), write_gguf(tmp_path / "ft.gguf", w1, kind)
    result = extract_adapter(base, ft, ExtractConfig(rank=RANK))
    s0, s1 = stored_hf(base, kind), stored_hf(ft, kind)
    assert set(result.adapter.modules) == set(CHANGED)
    for module in CHANGED:
        delta = s1[f"{module}.weight"] - s0[f"{module}.weight"]
        got = result.adapter.modules[module].delta_weight(torch.float64)
        assert rel(got, svd_reference(delta, RANK)) < 1e-5, module
        if kind == "F32":
            true = w1[f"{module}.weight"].double() - w0[f"{module}.weight"].double()
            assert rel(got, true) < 1e-5, module
    notes = {n.name: n.status for n in result.report.notes}
    assert (
        notes["model.norm.weight"] == "not-extracted" and notes["model.layers.0.input_layernorm.weight"] == "identical"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gguf_mixed_and_safetensors_pairs_give_one_adapter(dtype: torch.dtype, tmp_path: Path) -> None:
    """The same weights as GGUF, as safetensors, or one of each: the same factors and the same fingerprints
    (the GGUF's are merge's: `GgufBase.fingerprint` of the weights the adapter changes)."""
    kind = {torch.float32: "F32", torch.float16: "F16"}[dtype]
    w0, w1 = hf_pair()
    st = (write_dir(tmp_path / "base", w0, dtype), write_dir(tmp_path / "ft", w1, dtype))
    gg = (write_gguf(tmp_path / "base.gguf", w0, kind), write_gguf(tmp_path / "ft.gguf", w1, kind))
    results = [extract_adapter(b, f, ExtractConfig(rank=RANK)) for b, f in (st, gg, (st[0], gg[1]), (gg[0], st[1]))]
    reference = results[0].adapter
    for r in results[1:]:
        assert r.adapter.meta.base_fingerprint == reference.meta.base_fingerprint
        assert r.adapter.meta.base_views == reference.meta.base_views
        for module, m in reference.modules.items():
            assert torch.equal(r.adapter.modules[module].A, m.A) and torch.equal(r.adapter.modules[module].B, m.B)
    with Checkpoint(st[0]) as ckpt:
        assert reference.meta.base_fingerprint == ckpt.fingerprint(touched_weight_names(CHANGED, ckpt), fresh=True)
    base = open_base(gg[0])
    try:
        assert base.fingerprint(list(CHANGED), fresh=True) == reference.meta.base_fingerprint
    finally:
        base.close()


def test_gguf_to_gguf_cli_and_merge_back(tmp_path: Path) -> None:
    """The CLI takes a GGUF pair; the adapter merges into the GGUF base (its fingerprint checked) to the fine-tune."""
    w0, w1 = hf_pair()
    base, ft = write_gguf(tmp_path / "base.gguf", w0, "F32"), write_gguf(tmp_path / "ft.gguf", w1, "F32")
    code, _, err = run_cli("extract", base, ft, "-o", tmp_path / "lora", "--rank", str(RANK))
    assert code == 0, err
    report = loractl.merge(base, [tmp_path / "lora"], tmp_path / "merged.gguf")
    assert report.fingerprints[0] is not None
    merged, want = stored_hf(tmp_path / "merged.gguf", "F32"), stored_hf(ft, "F32")
    for module in CHANGED:
        assert rel(merged[f"{module}.weight"], want[f"{module}.weight"]) < 1e-6


def test_a_swapped_gguf_pair_is_refused_as_merge_refuses_a_swap(tmp_path: Path) -> None:
    """BASE a loractl merge into FINETUNED: the merge record in the GGUF's KV metadata says so, as the
    record beside a checkpoint does (tests/test_extract.py)."""
    w0, w1 = hf_pair()
    base, ft = write_gguf(tmp_path / "base.gguf", w0, "F32"), write_gguf(tmp_path / "ft.gguf", w1, "F32")
    extract_ops.extract(base, ft, tmp_path / "lora", ExtractConfig(rank=RANK))
    merged = tmp_path / "merged.gguf"
    loractl.merge(base, [tmp_path / "lora"], merged)
    code, out, err = run_cli("extract", merged, base, "-o", tmp_path / "x", "--rank", str(RANK))
    assert code == 2 and out == "" and "did you swap BASE and FINETUNED?" in err and not (tmp_path / "x").exists()
    assert f"hint: the base comes first: loractl extract {base} {merged}" in err
    assert run_cli("extract", base, merged, "-o", tmp_path / "y", "--rank", str(RANK))[0] == 0  # the right order


def test_a_quantized_base_records_no_fingerprint(tmp_path: Path) -> None:
    """As merge takes none of a quantized GGUF base: the adapter merges into it with a note, and into the
    Hugging Face checkpoint it was quantized from without a refusal."""
    w0, w1 = hf_pair()
    base, ft = write_gguf(tmp_path / "base.gguf", w0, "Q8_0"), write_gguf(tmp_path / "ft.gguf", w1, "Q8_0")
    extract_ops.extract(base, ft, tmp_path / "lora", ExtractConfig(rank=RANK))
    adapter = loractl.load_adapter(tmp_path / "lora")
    assert adapter.meta.base_fingerprint is None and adapter.meta.base_views == {}
    report = loractl.merge(base, [tmp_path / "lora"], tmp_path / "merged.gguf")
    assert report.fingerprints == (None,)
    loractl.merge(write_dir(tmp_path / "hf", w0), [tmp_path / "lora"], tmp_path / "merged-hf")


def test_a_single_file_sd_checkpoint_pairs_only_with_another(tmp_path: Path) -> None:
    sd = tmp_path / "sd.safetensors"
    save_tensors(sd, {"model.diffusion_model.out.2.weight": torch.zeros(4, 4)})
    other = write_dir(tmp_path / "hf", hf_pair()[0])
    with pytest.raises(ShapeMismatchError, match="pairs only with another"):
        extract_adapter(sd, other, ExtractConfig(rank=RANK))
    code, _, err = run_cli("extract", other, sd, "-o", tmp_path / "out", "--rank", "2")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and lines[0].startswith("error:") and "pairs only with another" in lines[0]
    assert lines[1].startswith("hint:") and not (tmp_path / "out").exists()


def test_a_gguf_adapter_is_no_checkpoint(tmp_path: Path, fixtures_dir: Path) -> None:
    w0 = hf_pair()[0]
    base = write_gguf(tmp_path / "base.gguf", w0, "F32")
    lora = tmp_path / "a.gguf"
    adapter = loractl.Adapter(modules={"model.layers.0.self_attn.v_proj": random_module(KV, HIDDEN, 2)})
    save_adapter(adapter, lora, format="gguf", options=WriteOptions(base=fixtures_dir / "tiny-llama"))
    code, _, err = run_cli("extract", base, lora, "-o", tmp_path / "out", "--rank", "2")
    assert code != 0 and "not a model" in err and "merge bases" not in err and not (tmp_path / "out").exists()


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every tensor extract hashes while it streams (the work a remembered pair saves)."""
    calls: list[str] = []
    real_feed, real_views = extract_ops.feed_fingerprint, FingerprintViews.feed

    def feed(h: object, name: str, *rest: object) -> None:
        calls.append(name)
        real_feed(h, name, *rest)  # type: ignore[arg-type]

    def views(self: FingerprintViews, name: str, tensor: torch.Tensor) -> None:
        calls.append(name)
        real_views(self, name, tensor)

    monkeypatch.setattr(extract_ops, "feed_fingerprint", feed)
    monkeypatch.setattr(FingerprintViews, "feed", views)
    monkeypatch.setenv("LORACTL_CACHE_DIR", str(Path(os.environ["LORACTL_CACHE_DIR"]) / "own"))
    return calls


@pytest.mark.parametrize("pair", ["safetensors", "gguf"])
def test_a_second_extract_hashes_nothing(pair: str, tmp_path: Path, hashed: list[str]) -> None:
    """The second run on the same pair hashes nothing and records the same fingerprints, which are the
    definition's (`Checkpoint.fingerprint` hashed afresh): adapters made before still match."""
    w0, w1 = hf_pair()
    if pair == "gguf":
        base, ft = write_gguf(tmp_path / "base.gguf", w0, "F32"), write_gguf(tmp_path / "ft.gguf", w1, "F32")
    else:
        base, ft = write_dir(tmp_path / "base", w0), write_dir(tmp_path / "ft", w1)
    first = extract_adapter(base, ft, ExtractConfig(rank=RANK)).adapter
    assert hashed
    hashed.clear()
    second = extract_adapter(base, ft, ExtractConfig(rank=RANK)).adapter
    assert hashed == []
    assert second.meta == first.meta and second.lineage[0]["params"] == first.lineage[0]["params"]
    ref = write_dir(tmp_path / "ref-base", w0), write_dir(tmp_path / "ref-ft", w1)
    with Checkpoint(ref[0]) as b, Checkpoint(ref[1]) as f:
        assert first.meta.base_fingerprint == b.fingerprint(touched_weight_names(CHANGED, b), fresh=True)
        assert first.meta.base_views == b.fingerprint_views(touched_weight_names(CHANGED, b))
        params = first.lineage[0]["params"]
        assert params["base"]["fingerprint"] == b.fingerprint(b.names, fresh=True)
        assert params["finetuned"]["fingerprint"] == f.fingerprint(f.names, fresh=True)
    hashed.clear()  # another plan over the same files (other targets) is hashed again
    extract_adapter(base, ft, ExtractConfig(rank=2, targets=("q_proj",)))
    assert hashed


def test_a_changed_or_swapped_pair_is_hashed_again(tmp_path: Path, hashed: list[str]) -> None:
    w0, w1 = hf_pair()
    base, ft = write_dir(tmp_path / "base", w0), write_dir(tmp_path / "ft", w1)
    first = extract_adapter(base, ft, ExtractConfig(rank=RANK)).adapter
    hashed.clear()
    swapped = extract_adapter(ft, base, ExtractConfig(rank=RANK)).adapter
    assert hashed and swapped.meta.base_fingerprint != first.meta.base_fingerprint
    hashed.clear()
    os.utime(base / "model.safetensors")  # touched: another identity
    assert extract_adapter(base, ft, ExtractConfig(rank=RANK)).adapter.meta == first.meta and hashed
