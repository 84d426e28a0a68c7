"""`loractl merge model.gguf ADAPTER`: checked against an independent reference and through llama.cpp itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run
from llama_adapters import HEADS, HIDDEN, INTERMEDIATE, KV, KV_HEADS, VOCAB, llama_cpp_permute, module, write_gguf_model

from loractl import merge, plan_merge
from loractl.adapter import Adapter, AdapterMeta
from loractl.errors import FormatError, ShapeMismatchError
from loractl.formats import save_adapter
from loractl.formats.options import WriteOptions

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

BLOCK = {"attn_norm": (HIDDEN,), "attn_q": (HIDDEN, HIDDEN), "attn_k": (KV, HIDDEN), "attn_v": (KV, HIDDEN),
         "attn_output": (HIDDEN, HIDDEN), "ffn_norm": (HIDDEN,), "ffn_gate": (INTERMEDIATE, HIDDEN),
         "ffn_up": (INTERMEDIATE, HIDDEN), "ffn_down": (HIDDEN, INTERMEDIATE)}  # fmt: skip
SHAPES = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN)}
SHAPES |= {f"blk.{i}.{k}.weight": s for i in range(2) for k, s in BLOCK.items()}
ADAPTED = {  # module → its GGUF tensor and the heads llama.cpp permuted its rows with (None: not permuted)
    "model.layers.0.self_attn.q_proj": ("blk.0.attn_q.weight", (HEADS, HEADS)),
    "model.layers.0.self_attn.k_proj": ("blk.0.attn_k.weight", (HEADS, KV_HEADS)),
    "model.layers.1.self_attn.v_proj": ("blk.1.attn_v.weight", None),
    "model.layers.1.mlp.down_proj": ("blk.1.ffn_down.weight", None),
}


def tiny_gguf(path: Path, kind: str, arch: str = "llama", odd: dict[str, str] | None = None) -> Path:
    """A tiny llama GGUF model: the adapted tensors in type `kind`, the rest F32 (and `odd` overrides)."""
    rng = np.random.default_rng(0)
    adapted = {t for t, _ in ADAPTED.values()}
    tensors = []
    for name, shape in SHAPES.items():
        qtype = (odd or {}).get(name) or (kind if name in adapted else "F32")
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if qtype == "I8":  # integers: neither gguf-py nor llama.cpp quantizes a float tensor into them
            data = np.zeros(shape, np.int8)
        tensors.append((name, data, qtype))
    return write_gguf_model(path, tensors, arch)


def adapter(scale: float = 1.0) -> Adapter:
    mods = {}
    for i, (name, (key, _)) in enumerate(ADAPTED.items()):
        out, inp = SHAPES[key]
        m = module(out, inp, rank=4, alpha=8.0, rslora=False, seed=i)
        mods[name] = type(m)(A=m.A * 0.05 * scale, B=m.B * 0.05, scale=m.scale, alpha=m.alpha)
    return Adapter(modules=mods, meta=AdapterMeta())


def tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1"])
def test_merge_matches_an_independent_reference(kind: str, tmp_path: Path) -> None:
    base = tiny_gguf(tmp_path / "base.gguf", kind)
    a = adapter()
    save_adapter(a, tmp_path / "peft", format="peft")
    report = merge(base, [tmp_path / "peft"], tmp_path / "out.gguf")
    before, after = tensors(base), tensors(tmp_path / "out.gguf")
    loss = {m.module: m.rounding_loss for m in report.modules}
    for name, (key, heads) in ADAPTED.items():
        w = gguf.quants.dequantize(before[key].data, T[kind]).astype(np.float64)
        delta = a.modules[name].delta_weight(torch.float64)
        delta = (llama_cpp_permute(delta, *heads) if heads else delta).numpy()
        want = w + delta
        got = gguf.quants.dequantize(after[key].data, T[kind]).astype(np.float64)
        rounded = gguf.quants.dequantize(gguf.quants.quantize(want.astype(np.float32), T[kind]), T[kind])
        floor = np.linalg.norm(rounded - want)  # what rounding into `kind` must remove
        assert np.linalg.norm(got - want) <= floor * (1 + 1e-3) + 1e-6 * np.linalg.norm(want), name
        if kind in ("F32", "F16", "BF16"):
            expected = np.linalg.norm(got - want) / np.linalg.norm(delta)
        else:  # requantized: the share of ΔW the stored change does not carry (issue 22 item 10)
            expected = 1 - np.clip(np.sum((got - w) * delta) / np.sum(delta * delta), 0, 1)
        assert loss[name] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    if kind == "F32":
        assert max(loss.values()) < 1e-6
    elif kind in ("F16", "BF16"):
        assert min(loss.values()) > 1e-4  # the report sees what rounding removed
    else:  # requantized: a share of ΔW (issue 22 item 10), 0 where the stored change carries all of it
        assert all(0 <= x <= 1 for x in loss.values())
    adapted = {k for k, _ in ADAPTED.values()}
    for name in SHAPES.keys() - adapted:  # untouched tensors: the same bytes
        assert before[name].data.tobytes() == after[name].data.tobytes(), name
    raw_in, raw_out = base.read_bytes(), (tmp_path / "out.gguf").read_bytes()
    first, out_first = (min(int(t.data_offset) for t in r.values()) for r in (before, after))
    assert len(raw_in) - first == len(raw_out) - out_first  # the header gains loractl.merge (tested below)


def test_gguf_adapter_and_weights(tmp_path: Path, fixtures_dir: Path) -> None:
    """A GGUF LoRA (q/k rows in llama.cpp's order) merges like the same PEFT adapter; --weight scales ΔW."""
    base = tiny_gguf(tmp_path / "base.gguf", "F32")
    save_adapter(adapter(), tmp_path / "peft", format="peft")
    save_adapter(adapter(), tmp_path / "a.gguf", format="gguf", options=WriteOptions(base=fixtures_dir / "tiny-llama"))
    save_adapter(adapter(0.5), tmp_path / "half", format="peft")
    merge(base, [tmp_path / "peft"], tmp_path / "p.gguf")
    merge(base, [tmp_path / "a.gguf"], tmp_path / "g.gguf")
    merge(base, [tmp_path / "peft"], tmp_path / "w.gguf", weights=[0.5])
    merge(base, [tmp_path / "half"], tmp_path / "h.gguf")
    p, g, w, h = (tensors(tmp_path / f"{n}.gguf") for n in "pgwh")
    for key, _ in ADAPTED.values():
        ref = np.asarray(p[key].data)
        assert np.allclose(np.asarray(g[key].data), ref, rtol=0, atol=1e-6 * np.abs(ref).max()), key
        assert np.allclose(np.asarray(w[key].data), np.asarray(h[key].data), rtol=0, atol=1e-6), key


def test_refusals_write_nothing(tmp_path: Path, fixtures_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_adapter(adapter(), tmp_path / "peft", format="peft")
    odd = tiny_gguf(tmp_path / "odd.gguf", "F32", odd={"blk.0.attn_q.weight": "I8"})
    code, _, err = run(capsys, "merge", str(odd), str(tmp_path / "peft"), "-o", str(tmp_path / "out.gguf"))
    assert code == 1 and "is I8" in err and "Q8_0" in err and "Q4_K" in err and "hint:" in err
    assert not (tmp_path / "out.gguf").exists()

    other = tiny_gguf(tmp_path / "gpt2.gguf", "F32", arch="gpt2")
    with pytest.raises(ShapeMismatchError, match="no tensor of this gpt2 GGUF"):
        merge(other, [tmp_path / "peft"], tmp_path / "out.gguf")

    qwen = tmp_path / "qwen-config"
    qwen.mkdir()
    (qwen / "config.json").write_text(
        (fixtures_dir / "tiny-llama" / "config.json").read_text().replace('"llama"', '"qwen2"')
    )
    save_adapter(adapter(), tmp_path / "qwen.gguf", format="gguf", options=WriteOptions(base=qwen))
    plan = plan_merge(tmp_path / "gpt2.gguf", [tmp_path / "qwen.gguf"])
    llama = plan_merge(tiny_gguf(tmp_path / "base.gguf", "F32"), [tmp_path / "qwen.gguf"])
    assert {p.code for p in llama.problems} == {"base-architecture"} and plan.problems

    with pytest.raises(FormatError, match="not a model"):
        merge(tmp_path / "qwen.gguf", [tmp_path / "peft"], tmp_path / "out.gguf")
    code, _, err = run(capsys, "merge", str(odd), str(tmp_path / "peft"), "-o", str(tmp_path / "o"), "--dtype", "f16")
    assert code == 2 and "--dtype" in err
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_cli_reports_rounding_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    base = tiny_gguf(tmp_path / "base.gguf", "Q4_0")
    save_adapter(adapter(), tmp_path / "peft", format="peft")
    code, out, _ = run(capsys, "merge", str(base), str(tmp_path / "peft"), "--dry-run", "--json")
    assert code == 0 and json.loads(out)["tensors_merged"] == len(ADAPTED)
    code, out, err = run(capsys, "merge", str(base), str(tmp_path / "peft"), "-o", str(tmp_path / "m.gguf"), "--json")
    doc = json.loads(out)
    assert code == 0 and len(doc["modules"]) == len(ADAPTED) and doc["tensors_copied"] == len(SHAPES) - len(ADAPTED)
    assert all(m["stored_type"] == "Q4_0" and m["rounding_loss"] > 0 for m in doc["modules"])
    if max(m["rounding_loss"] for m in doc["modules"]) > 0.1:
        assert "warning:" in err and "rounding" in err


def test_library_merge_takes_a_gguf_base_and_records_provenance(tmp_path: Path) -> None:
    """`loractl.merge("model.gguf", ["lora/"], "out.gguf")`: one merge for every base; the output's KV
    metadata holds loractl's provenance, everything else of the header is the base's."""
    import json

    base = tiny_gguf(tmp_path / "base.gguf", "Q8_0")
    a = adapter()
    save_adapter(a, tmp_path / "lora", format="peft")
    report = merge(str(base), [str(tmp_path / "lora")], str(tmp_path / "out.gguf"))
    assert len(report.modules) == len(ADAPTED)
    before, after = gguf.GGUFReader(base), gguf.GGUFReader(tmp_path / "out.gguf")
    record = json.loads(after.fields["loractl.merge"].contents())
    assert record["op"] == "merge" and record["adapters"][0]["content_hash"] == a.content_hash()
    assert record["adapters"][0]["base_fingerprint"] is None  # Q8_0 cannot give the original bytes
    assert {k: f.contents() for k, f in before.fields.items() if not k.startswith("GGUF.")} == {
        k: f.contents() for k, f in after.fields.items() if not k.startswith("GGUF.") and k != "loractl.merge"
    }
    adapted = {k for k, _ in ADAPTED.values()}
    for t, u in zip(before.tensors, after.tensors, strict=True):
        assert (t.name, t.tensor_type, list(t.shape)) == (u.name, u.tensor_type, list(u.shape))
        assert t.name in adapted or t.data.tobytes() == u.data.tobytes(), t.name
    again = merge(tmp_path / "out.gguf", [tmp_path / "lora"], tmp_path / "twice.gguf")  # a merged base: one entry
    assert len(again.modules) == len(ADAPTED)
    assert list(gguf.GGUFReader(tmp_path / "twice.gguf").fields).count("loractl.merge") == 1


def test_requantized_rounding_loss_is_the_share_of_delta_w_lost(tmp_path: Path) -> None:
    """Issue 22 item 10: a Q4_0 merge reported more than 100% of ΔW removed. For block-quantized types the
    loss is 1 − clip(⟨ΔW_s, ΔW⟩/‖ΔW‖², 0, 1) with ΔW_s the stored change: in [0, 1], against a dense reference."""
    relative = []  # the figure the report gave before: ‖ΔW_s − ΔW‖/‖ΔW‖
    for kind, scale in (("Q4_0", 0.2), ("Q4_0", 1.0), ("Q8_0", 1.0), ("Q5_1", 0.2)):
        base = tiny_gguf(tmp_path / f"{kind}.gguf", kind)
        a = adapter(scale)
        save_adapter(a, tmp_path / "peft", format="peft", force=True)
        report = merge(base, [tmp_path / "peft"], tmp_path / "out.gguf", force=True)
        before, after = tensors(base), tensors(tmp_path / "out.gguf")
        for m in report.modules:
            key, heads = ADAPTED[m.module]
            w = gguf.quants.dequantize(before[key].data, T[kind]).astype(np.float64)
            delta = a.modules[m.module].delta_weight(torch.float64)
            delta = (llama_cpp_permute(delta, *heads) if heads else delta).numpy()
            stored = gguf.quants.dequantize(after[key].data, T[kind]).astype(np.float64) - w
            want = 1 - np.clip(np.sum(stored * delta) / np.sum(delta * delta), 0, 1)
            assert m.rounding_loss is not None and 0 <= m.rounding_loss <= 1, (kind, m.module, m.rounding_loss)
            assert m.rounding_loss == pytest.approx(want, abs=1e-6), (kind, m.module)
            relative.append(np.linalg.norm(stored - delta) / np.linalg.norm(delta))
            assert m.rounding_error == pytest.approx(relative[-1], rel=1e-5), (kind, m.module)  # shown beside it
    assert max(relative) > 1  # these cases reproduce "removes 135% of ΔW"


def _hf_reference(base: Path, tmp: Path) -> Path:
    """The adapted tensors of the F32 GGUF as the Hugging Face checkpoint it came from (q/k rows unpermuted)."""
    from safetensors.torch import save_file

    out, stored = tmp / "hf", tensors(base)
    out.mkdir()
    state = {}
    for name, (key, heads) in ADAPTED.items():
        w = torch.from_numpy(np.array(stored[key].data, dtype=np.float32).reshape(SHAPES[key]))
        if heads:
            order = llama_cpp_permute(torch.arange(w.shape[0]), *heads)  # meta row i is hf row order[i]
            w = torch.empty_like(w).index_copy_(0, order, w)
        state[f"{name}.weight"] = w.contiguous()
    save_file(state, out / "model.safetensors")
    return out


def test_gguf_base_fingerprint_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An adapter that records its base: checked against a GGUF base in the adapter's terms; a cast (F16) is
    that base, another base is refused (--allow-base-mismatch merges anyway), a quantized base is noted."""
    from dataclasses import replace

    from loractl.errors import IntegrityError
    from loractl.io.checkpoint import Checkpoint

    f32 = tiny_gguf(tmp_path / "f32.gguf", "F32")
    with Checkpoint(_hf_reference(f32, tmp_path)) as ckpt:
        names = [f"{m}.weight" for m in ADAPTED]
        recorded, views = ckpt.fingerprint(names), ckpt.fingerprint_views(names)
    a = adapter()
    save_adapter(
        replace(a, meta=AdapterMeta(base_fingerprint=recorded, base_views=views)), tmp_path / "mine", format="peft"
    )
    other = "sha256:" + "0" * 64
    save_adapter(replace(a, meta=AdapterMeta(base_fingerprint=other)), tmp_path / "theirs", format="peft")

    report = merge(f32, [tmp_path / "mine"], tmp_path / "a.gguf")
    assert report.fingerprints == (recorded,) and report.base_notes == ()
    f16 = merge(tiny_gguf(tmp_path / "f16.gguf", "F16"), [tmp_path / "mine"], tmp_path / "b.gguf")
    assert "another floating dtype" in f16.base_notes[0]
    q8 = merge(tiny_gguf(tmp_path / "q8.gguf", "Q8_0"), [tmp_path / "mine"], tmp_path / "c.gguf")
    assert q8.fingerprints == (None,) and "cannot be checked" in q8.base_notes[0]
    with pytest.raises(IntegrityError, match="made for another base"):
        merge(f32, [tmp_path / "theirs"], tmp_path / "d.gguf")
    assert not (tmp_path / "d.gguf").exists()
    code, _, err = run(capsys, "merge", str(f32), str(tmp_path / "theirs"), "-o", str(tmp_path / "d.gguf"),
                       "--allow-base-mismatch")  # fmt: skip
    assert code == 0 and "merged anyway" in err


def _peft_pickle(tmp: Path) -> Path:
    from safetensors.torch import load_file

    save_adapter(adapter(), tmp / "pickled", format="peft")
    weights = tmp / "pickled" / "adapter_model.safetensors"
    torch.save(load_file(weights), tmp / "pickled" / "adapter_model.bin")
    weights.unlink()
    return tmp / "pickled"


def _old_mlx_npz(tmp: Path) -> Path:
    """mlx-examples' first format: `.npz` factors as (in, r) and (r, out), no scale stored."""
    arrays = {}
    for name, m in adapter().modules.items():
        arrays[f"{name}.lora_a"] = m.A.T.numpy()
        arrays[f"{name}.lora_b"] = m.B.T.numpy()
    np.savez(tmp / "adapters.npz", **arrays)
    return tmp / "adapters.npz"


@pytest.mark.parametrize(
    ("case", "argv"),
    [
        ("pickle", ["--allow-pickle"]),
        ("loralib", ["--from", "loralib", "--allow-pickle", "--alpha", "8"]),
        ("npz", ["--scale", "2"]),
    ],
)
def test_reading_options_reach_a_gguf_merge(
    case: str, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--allow-pickle, --from, --alpha and --scale were dropped for GGUF bases: each is now what makes the
    adapter readable, and the merge equals the merge of the same adapter saved as PEFT safetensors."""
    base = tiny_gguf(tmp_path / "base.gguf", "F32")
    save_adapter(adapter(), tmp_path / "peft", format="peft")
    merge(base, [tmp_path / "peft"], tmp_path / "want.gguf")
    if case == "pickle":
        source = _peft_pickle(tmp_path)
    elif case == "loralib":
        source = save_adapter(adapter(), tmp_path / "lora.bin", format="loralib")
    else:
        source = _old_mlx_npz(tmp_path)
    out = tmp_path / "got.gguf"
    code, _, err = run(capsys, "merge", str(base), str(source), "-o", str(out))
    assert code != 0 and any(flag in err for flag in argv) and not out.exists()
    code, _, err = run(capsys, "merge", str(base), str(source), "-o", str(out), *argv)
    assert code == 0, err
    got, want = tensors(out), tensors(tmp_path / "want.gguf")
    for key, _ in ADAPTED.values():
        assert np.allclose(np.asarray(got[key].data), np.asarray(want[key].data), rtol=0, atol=1e-7), key


def test_from_and_device_reach_a_gguf_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--from and --device were dropped for GGUF bases: a wrong format or device is now an error, not ignored."""
    base = tiny_gguf(tmp_path / "base.gguf", "F32")
    save_adapter(adapter(), tmp_path / "peft", format="peft")
    out = tmp_path / "out.gguf"
    code, _, err = run(capsys, "merge", str(base), str(tmp_path / "peft"), "-o", str(out), "--from", "mlx")
    assert code != 0 and "error:" in err and not out.exists()
    code, _, err = run(capsys, "merge", str(base), str(tmp_path / "peft"), "-o", str(out), "--device", "tpu")
    assert code == 2 and "tpu" in err and not out.exists()
    code, _, err = run(capsys, "merge", str(base), str(tmp_path / "peft"), "-o", str(out), "--device", "cpu")
    assert code == 0, err


# Through llama.cpp: the merged GGUF must answer like the base with the adapter applied at run time.
ACTIVATION_ROUNDING = {"f32": 0.0, "f16": 2**-11, "bf16": 2**-8, "q8_0": 1 / 254}  # unit roundoff of each
TOKENS = [1, 504, 3458, 282, 4287, 314, 253, 1345, 30, 378, 2106, 4704, 17]


def _llama_adapter(model_dir: Path, layers: range, std: float) -> Adapter:
    import json

    config = json.loads((model_dir / "config.json").read_text())
    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    kv_dim = hidden // heads * kv
    g = torch.Generator().manual_seed(0)
    mods = {}
    for layer in layers:
        for leaf, out in (("q_proj", hidden), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            a, b = torch.randn(8, hidden, generator=g) / hidden**0.5, torch.randn(out, 8, generator=g) * std
            mods[f"model.layers.{layer}.self_attn.{leaf}"] = module(out, hidden, 8, 16.0, False, 0).__class__(
                A=a, B=b, scale=2.0, alpha=16.0
            )
    return Adapter(modules=mods, meta=AdapterMeta())


def _through_llama_cpp(base: Path, model_dir: Path, layers: range, std: float, tmp: Path) -> tuple[float, float, float]:
    """(‖merged − runtime‖/‖runtime − base‖ of the logits, the same for the control, the worst rounding loss).

    The control merges without llama.cpp's q/k row order: it must miss by far more.
    """
    from unittest import mock

    from llama_cpp_tools import logits

    from loractl.bases.gguf import GgufBase

    a = _llama_adapter(model_dir, layers, std)
    save_adapter(a, tmp / "peft", format="peft")
    save_adapter(a, tmp / "lora.gguf", format="gguf", options=WriteOptions(base=model_dir))
    report = merge(base, [tmp / "peft"], tmp / "merged.gguf")
    with mock.patch.object(GgufBase, "_heads", lambda self: None):
        merge(base, [tmp / "peft"], tmp / "control.gguf")
    plain, runtime = logits(base, TOKENS), logits(base, TOKENS, lora=tmp / "lora.gguf")
    merged, control = logits(tmp / "merged.gguf", TOKENS), logits(tmp / "control.gguf", TOKENS)
    effect = np.linalg.norm(runtime - plain)
    assert effect > 1e-2 * np.linalg.norm(plain)  # the adapter visibly changes the logits
    worst = report.worst_rounding_error or 0.0  # the stored tensors' distance from W + ΔW, noise included
    return float(np.linalg.norm(merged - runtime) / effect), float(np.linalg.norm(control - runtime) / effect), worst


@pytest.fixture(scope="module")
def tiny_llama(smollm2: Path) -> Path:
    from llama_cpp_tools import tiny_llama

    return tiny_llama(smollm2)


@pytest.mark.parametrize(
    "outtype",
    ["f32", "q8_0", pytest.param("f16", marks=pytest.mark.slow), pytest.param("bf16", marks=pytest.mark.slow)],
)
def test_llama_cpp_runs_the_merge_like_the_adapter(outtype: str, tiny_llama: Path, tmp_path: Path) -> None:
    """llama.cpp's converter makes the base; llama.cpp runs base + adapter and the merged file."""
    from llama_cpp_tools import hf_to_gguf

    base = hf_to_gguf(tiny_llama, outtype)
    miss, control, worst = _through_llama_cpp(base, tiny_llama, range(2), 0.3, tmp_path)
    # llama.cpp rounds the activations to the weights' dot-product type too (f16, bf16, q8_0 blocks), which
    # touches the merged ΔW but not the float32 LoRA path: the miss is the weights' rounding plus that one.
    tolerance = 1e-3 + 2 * (worst + ACTIVATION_ROUNDING[outtype])
    assert miss <= tolerance, (miss, worst)
    assert control > 10 * tolerance, control


@pytest.mark.interop
def test_llama_cpp_loads_the_provenance_entry(tiny_llama: Path, tmp_path: Path) -> None:
    """The `loractl.merge` KV entry is one llama.cpp ignores: a merge with weight 0 changes no weight, so
    llama.cpp must give the base's logits exactly from the file that carries it. The adapter records the
    Hugging Face base's fingerprint: llama.cpp's own F32 conversion of that base has it, its F16 one is
    the same base in another dtype."""
    import json
    from dataclasses import replace

    from llama_cpp_tools import hf_to_gguf, logits

    from loractl.io.checkpoint import Checkpoint

    base = hf_to_gguf(tiny_llama, "f32")
    a = _llama_adapter(tiny_llama, range(2), 0.3)
    with Checkpoint(tiny_llama) as ckpt:
        names = sorted(f"{m}.weight" for m in a.modules)
        meta = AdapterMeta(base_fingerprint=ckpt.fingerprint(names), base_views=ckpt.fingerprint_views(names))
    save_adapter(replace(a, meta=meta), tmp_path / "peft", format="peft")
    report = merge(base, [tmp_path / "peft"], tmp_path / "merged.gguf", weights=[0.0])
    assert report.fingerprints == (meta.base_fingerprint,) and report.base_notes == ()
    record = json.loads(gguf.GGUFReader(tmp_path / "merged.gguf").fields["loractl.merge"].contents())
    assert record["adapters"] == [{"content_hash": report.adapter_hashes[0], "format": "peft", "weight": 0.0,
                                   "base_fingerprint": meta.base_fingerprint}]  # fmt: skip
    assert np.array_equal(logits(tmp_path / "merged.gguf", TOKENS), logits(base, TOKENS))
    f16 = merge(hf_to_gguf(tiny_llama, "f16"), [tmp_path / "peft"], tmp_path / "f16.gguf")
    assert "another floating dtype" in f16.base_notes[0]


@pytest.mark.slow
def test_llama_cpp_runs_the_merge_into_the_real_q4_1_smollm2(smollm2: Path, tmp_path: Path) -> None:
    from llama_cpp_tools import smollm2_q4_1

    miss, control, worst = _through_llama_cpp(smollm2_q4_1(), smollm2, range(0, 30, 6), 0.3, tmp_path)
    assert miss <= 2 * (worst + ACTIVATION_ROUNDING["q8_0"]), (miss, worst)  # Q4_1 dots run on q8 activations
    assert control > miss, (control, miss)
