"""The PEFT format on its own: exact round trips, deterministic bytes, config semantics, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loractl import lineage
from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.errors import AdapterError, FormatError, PickleRefusedError, UnknownFormatError
from loractl.formats import describe_adapter, detect_format, load_adapter, save_adapter
from loractl.formats.peft.config import exact_alpha, module_alpha_rank, pattern_value
from loractl.info import scale_from_alpha
from loractl.io.safetensors_header import read_header
from tests.helpers import qv_adapter, random_module

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
AWKWARD_ALPHAS = (0.1, 1 / 3, 7.7, 1e-3, 16.0, 2.5e5)
PATHS = [f"model.layers.{i}.{p}" for i in range(3) for p in ("self_attn.q_proj", "mlp.down_proj", "conv", "embed")]


# --- strategies -------------------------------------------------------------------------------


@st.composite
def adapters(draw: st.DrawFn) -> Adapter:
    """Adapters with everything PEFT can hold: mixed ranks and alphas, exact or arbitrary scales, rsLoRA,
    DoRA, lora bias, embeddings, conv kernels, Conv1D orientation, full tensors; one dtype per adapter."""
    dtype = draw(st.sampled_from(DTYPES))
    dora = draw(st.booleans())  # all or none: PEFT cannot mix (refused, see test_mixed_dora_is_refused)
    names = draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=4, unique=True))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    modules = {name: _module(draw, name, dtype, gen, dora) for name in names}
    full_names = draw(
        st.lists(st.sampled_from(["lm_head.weight", "model.norm.weight", f"{names[0]}.bias"]), unique=True)
    )
    full = {k: torch.randn(3, 2, generator=gen).to(dtype) for k in full_names}
    return Adapter(modules=modules, full_tensors=full, meta=AdapterMeta(base_model="tiny", task_type="CAUSAL_LM"))


def _module(draw: st.DrawFn, name: str, dtype: torch.dtype, gen: torch.Generator, dora: bool) -> LoraModule:
    """rsLoRA, bias and Conv1D orientation vary per module: PEFT's config says each once, loractl's record the rest."""
    rslora, bias, fan_in = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    rank, inp, out = draw(st.sampled_from([1, 2, 3, 4, 5, 7])), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    kind = "conv" if name.endswith("conv") else "embedding" if name.endswith("embed") else "linear"
    kernel = draw(st.sampled_from([(1, 1), (3, 3), (1, 3)])) if kind == "conv" else ()
    a = torch.randn(rank, inp, *kernel, generator=gen).to(dtype)
    b = torch.randn(out, rank, *((1,) * len(kernel)), generator=gen).to(dtype)
    a.view(-1)[0] = -0.0  # signed zeros must survive too
    alpha = draw(st.one_of(st.sampled_from(AWKWARD_ALPHAS), st.floats(1e-4, 1e4), st.none()))
    if alpha is not None:
        scale = scale_from_alpha(alpha, rank, rslora)
    else:  # a scale set directly (rescale, combine): a few ulps off an alpha's, often not alpha/r for any alpha
        scale = draw(st.floats(1e-6, 1e6, allow_subnormal=False))
        for _ in range(draw(st.integers(0, 3))):
            scale = math.nextafter(scale, math.inf)
    return LoraModule(
        A=a,
        B=b,
        scale=scale,
        alpha=alpha,
        scale_rule="alpha/sqrt(r)" if rslora else "alpha/r",
        kind=kind,  # type: ignore[arg-type]
        fan_in_fan_out=fan_in and kind == "linear",
        magnitude=torch.rand(out, generator=gen).to(dtype) if dora else None,
        bias=torch.randn(out, generator=gen).to(dtype) if bias else None,
    )


def _bits(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    return t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_adapter(got: Adapter, want: Adapter) -> None:
    """Every tensor bit-identical, every scale exactly equal, same orientation flags."""
    assert sorted(got.modules) == sorted(want.modules)
    for name, w in want.modules.items():
        g = got.modules[name]
        assert g.scale == w.scale, (name, g.scale, w.scale)
        assert (g.kind, g.fan_in_fan_out, g.rank) == (w.kind, w.fan_in_fan_out, w.rank), name
        assert g.tensors().keys() == w.tensors().keys(), name
        for role, t in w.tensors().items():
            assert _bits(g.tensors()[role]) == _bits(t), (name, role)
    assert sorted(got.full_tensors) == sorted(want.full_tensors)
    for key, t in want.full_tensors.items():
        assert _bits(got.full_tensors[key]) == _bits(t), key
    assert got.content_hash() == want.content_hash()


# --- round trips --------------------------------------------------------------------------------


@given(adapter=adapters())
def test_read_write_round_trip_is_exact(adapter: Adapter, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.mktemp("rt") / "adapter"
    save_adapter(adapter, out)
    back = load_adapter(out)
    assert_same_adapter(back, adapter)
    assert back.meta.recorded_hash == adapter.content_hash()
    assert back.meta.source_format == "peft" and back.warnings == ()
    assert describe_adapter(out).findings == ()


@given(adapter=adapters())
def test_writing_twice_gives_identical_bytes(adapter: Adapter, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("det")
    save_adapter(adapter, root / "one")
    shuffled = dataclasses.replace(
        adapter,
        modules=dict(reversed(list(adapter.modules.items()))),
        full_tensors=dict(reversed(list(adapter.full_tensors.items()))),
    )
    save_adapter(shuffled, root / "two")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (root / "one" / name).read_bytes() == (root / "two" / name).read_bytes(), name
    assert shuffled.content_hash() == adapter.content_hash()


def test_awkward_alpha_is_written_as_is_and_read_back_exactly(tmp_path: Path) -> None:
    m = random_module(4, 4, 3, alpha=0.1)
    a = Adapter(
        modules={"model.layers.0.self_attn.q_proj": m, "model.layers.0.self_attn.v_proj": random_module(4, 4, 8)}
    )
    save_adapter(a, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] in (3, 8)
    assert module_alpha_rank(config, "model.layers.0.self_attn.q_proj") == (0.1, 3)
    back = load_adapter(tmp_path / "out").modules["model.layers.0.self_attn.q_proj"]
    assert back.scale == 0.1 / 3 and back.alpha == 0.1


def test_scale_no_alpha_can_express_travels_in_the_record(tmp_path: Path) -> None:
    # for rank 3 and scales in [2/3, 1), alpha = 3·scale has a coarser ulp than scale: some scales have no alpha
    candidates = [0.7]
    for _ in range(20):
        candidates.append(math.nextafter(candidates[-1], 1.0))
    scale = next(s for s in candidates if exact_alpha(s, 3, False, None) is None)
    m = dataclasses.replace(random_module(4, 4, 3), scale=scale, alpha=None)
    save_adapter(Adapter(modules={"q": m}), tmp_path / "out")
    record = lineage.decode(read_header(tmp_path / "out" / "adapter_model.safetensors").metadata)
    assert record is not None and record.scales == {"q": scale}
    assert load_adapter(tmp_path / "out").modules["q"].scale == scale


def test_written_file_keeps_peft_keys_and_a_readable_record(tmp_path: Path) -> None:
    a = qv_adapter().with_lineage(lineage.new_entry("test", {"k": 1}, ["sha256:00"]))
    save_adapter(a, tmp_path / "out")
    header = read_header(tmp_path / "out" / "adapter_model.safetensors")
    assert header.metadata["format"] == "pt"
    assert set(header.tensors) == {
        f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{f}.weight"
        for i in range(2)
        for p in "qv"
        for f in "AB"
    }
    record = lineage.decode(header.metadata)
    assert record is not None and record.content_hash == a.content_hash() and record.lineage == a.lineage
    assert load_adapter(tmp_path / "out").lineage == a.lineage


def test_mixed_dora_is_refused(tmp_path: Path) -> None:
    a = qv_adapter()
    first = next(iter(a.modules))
    modules = dict(a.modules)
    modules[first] = dataclasses.replace(modules[first], magnitude=torch.ones(modules[first].out_features))
    with pytest.raises(AdapterError, match="DoRA"):
        save_adapter(dataclasses.replace(a, modules=modules), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shipped_fixtures_read_with_the_configured_scales(fixtures_dir: Path) -> None:
    patterns = load_adapter(fixtures_dir / "adapters" / "tiny-patterns")
    assert len(patterns.modules) == 14
    q0, v1 = patterns.modules["model.layers.0.self_attn.q_proj"], patterns.modules["model.layers.1.self_attn.v_proj"]
    assert (q0.rank, q0.scale) == (4, 16 / math.sqrt(4))
    assert (v1.rank, v1.scale) == (2, 8 / math.sqrt(2))
    dora = load_adapter(fixtures_dir / "adapters" / "tiny-dora")
    assert all(m.magnitude is not None and m.magnitude.shape == (m.out_features,) for m in dora.modules.values())


# --- config semantics ---------------------------------------------------------------------------


def test_pattern_value_follows_peft_first_match_with_dot_boundary() -> None:
    from peft.utils.other import get_pattern_key

    patterns = {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 3, "q_proj": 5}
    for module in ["model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                   "model.layers.0.self_attn.xv_proj", "v_proj"]:  # fmt: skip
        key = get_pattern_key(list(patterns), module)
        assert pattern_value(patterns, module) == patterns.get(key), module


@given(
    scale=st.floats(1e-8, 1e8, allow_subnormal=False),
    rank=st.integers(1, 1024),
    rslora=st.booleans(),
)
def test_exact_alpha_is_exact_or_none(scale: float, rank: int, rslora: bool) -> None:
    alpha = exact_alpha(scale, rank, rslora, None)
    if alpha is not None:
        assert scale_from_alpha(alpha, rank, rslora) == scale


@given(alpha=st.floats(1e-6, 1e6, allow_subnormal=False), rank=st.integers(1, 1024), rslora=st.booleans())
def test_exact_alpha_prefers_the_written_alpha(alpha: float, rank: int, rslora: bool) -> None:
    assert exact_alpha(scale_from_alpha(alpha, rank, rslora), rank, rslora, alpha) == alpha


# --- bad input ----------------------------------------------------------------------------------


def _copy(fixtures_dir: Path, tmp_path: Path, name: str = "tiny-qv") -> Path:
    return Path(shutil.copytree(fixtures_dir / "adapters" / name, tmp_path / name))


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def test_non_json_config_is_a_format_error_naming_the_file(fixtures_dir: Path, tmp_path: Path) -> None:
    root = _copy(fixtures_dir, tmp_path)
    (root / "adapter_config.json").write_text("{ not json")
    assert detect_format(root) == "peft"
    with pytest.raises(FormatError, match="not valid JSON") as e:
        load_adapter(root)
    assert e.value.path == str(root / "adapter_config.json")


@pytest.mark.parametrize("content", ["[1, 2]", '{"peft_type": "IA3", "r": 8}'])
def test_config_that_is_not_a_lora_object_is_refused(fixtures_dir: Path, tmp_path: Path, content: str) -> None:
    root = _copy(fixtures_dir, tmp_path)
    (root / "adapter_config.json").write_text(content)
    with pytest.raises(FormatError) as e:
        load_adapter(root, format="peft")
    assert e.value.path == str(root / "adapter_config.json")


def test_missing_weights_are_a_format_error(fixtures_dir: Path, tmp_path: Path) -> None:
    root = _copy(fixtures_dir, tmp_path)
    (root / "adapter_model.safetensors").unlink()
    with pytest.raises(FormatError, match=re.escape("no adapter_model.safetensors")):
        load_adapter(root)


def test_truncated_weights_are_a_format_error(fixtures_dir: Path, tmp_path: Path) -> None:
    root = _copy(fixtures_dir, tmp_path)
    weights = root / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated") as e:
        load_adapter(root)
    assert e.value.path == str(weights)


def test_legacy_pickle_needs_allow_pickle(fixtures_dir: Path, tmp_path: Path) -> None:
    root = _copy(fixtures_dir, tmp_path)
    want = load_adapter(root)
    from safetensors.torch import load_file

    torch.save(load_file(root / "adapter_model.safetensors"), root / "adapter_model.bin")
    (root / "adapter_model.safetensors").unlink()
    before = _digest(root)
    with pytest.raises(PickleRefusedError, match="pickle") as e:
        load_adapter(root)
    assert e.value.path == str(root / "adapter_model.bin") and "--allow-pickle" in (e.value.hint or "")
    got = load_adapter(root, allow_pickle=True)
    assert got.content_hash() == want.content_hash()
    assert _digest(root) == before


def test_pickle_with_arbitrary_objects_is_refused_even_when_allowed(fixtures_dir: Path, tmp_path: Path) -> None:
    root = _copy(fixtures_dir, tmp_path)
    (root / "adapter_model.safetensors").unlink()
    torch.save({"w": torch.zeros(1), "evil": _Evil()}, root / "adapter_model.bin")
    with pytest.raises(FormatError, match="cannot load pickle safely"):
        load_adapter(root, allow_pickle=True)


class _Evil:
    """Any class outside the weights_only allow-list must stop the unpickler."""


def test_a_without_b_is_refused_with_the_module(fixtures_dir: Path, tmp_path: Path) -> None:
    root = _copy(fixtures_dir, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(root / "adapter_model.safetensors")
    victim = next(k for k in tensors if k.endswith("lora_B.weight"))
    del tensors[victim]
    save_file(tensors, root / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="A factor without its B factor") as e:
        load_adapter(root)
    assert victim.removeprefix("base_model.model.").removesuffix(".lora_B.weight") in e.value.message


def test_unknown_file_shows_some_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(2), "other.bias": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(UnknownFormatError, match=re.escape("some.weight")):
        load_adapter(tmp_path / "x.safetensors")


def test_reading_and_writing_never_modify_inputs(fixtures_dir: Path, tmp_path: Path) -> None:
    roots = [_copy(fixtures_dir, tmp_path, n) for n in ("tiny-qv", "tiny-patterns", "tiny-dora")]
    before = {r.name: (_digest(r), {p.name: p.stat().st_mtime_ns for p in r.iterdir()}) for r in roots}
    for r in roots:
        a = load_adapter(r)
        describe_adapter(r)
        save_adapter(a, tmp_path / "out" / r.name)
    assert before == {r.name: (_digest(r), {p.name: p.stat().st_mtime_ns for p in r.iterdir()}) for r in roots}


def test_existing_output_is_refused_and_left_alone(tmp_path: Path) -> None:
    from loractl.errors import OutputExistsError

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(OutputExistsError):
        save_adapter(qv_adapter(), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]
    save_adapter(qv_adapter(), tmp_path / "out", force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_mixed_bias_and_orientation_round_trip_and_pad_for_peft(tmp_path: Path) -> None:
    a = qv_adapter()
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    modules = dict(a.modules)
    modules[q] = dataclasses.replace(modules[q], bias=torch.ones(modules[q].out_features), fan_in_fan_out=True)
    mixed = dataclasses.replace(a, modules=modules)
    save_adapter(mixed, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["fan_in_fan_out"] is True
    header = read_header(tmp_path / "out" / "adapter_model.safetensors")
    assert f"base_model.model.{v}.lora_B.bias" in header.tensors  # PEFT wants a bias on every module
    back = load_adapter(tmp_path / "out")
    assert back.modules[v].bias is None and not back.modules[v].fan_in_fan_out
    assert_same_adapter(back, mixed)


def test_keys_without_the_peft_prefix_read_the_same(fixtures_dir: Path, tmp_path: Path) -> None:
    """transformers' own PEFT integration saves `model.layers...` without `base_model.model.`."""
    from safetensors.torch import load_file, save_file

    root = _copy(fixtures_dir, tmp_path, "tiny-dora")
    want = load_adapter(root)
    tensors = load_file(root / "adapter_model.safetensors")
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, root / "adapter_model.safetensors")
    got = load_adapter(root)
    assert_same_adapter(got, want)
    assert got.warnings == ()
