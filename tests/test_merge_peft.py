"""merge against PEFT's `merge_and_unload()` on tiny transformers models (sharded, fp32 and bf16).

LoRA: every element bit-identical to PEFT's, in fp32 (where each float32 rounding shows) and bf16,
row blocks included. DoRA (PEFT takes its norms in another order): fp32 within a relative 1e-6 of
PEFT's (max |a − b| / max |b|), bf16 identical or one bf16 ulp apart. The merged checkpoints must
also load in transformers and give PEFT's logits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from loractl.io.checkpoint import Checkpoint
from loractl.ops.merge import merge
from tests.conftest import FIXTURES

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(FIXTURES))
from make_fixtures import tiny_llama_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENS = torch.tensor([[1, 5, 9, 77, 3, 200, 14, 2]])


@pytest.fixture(scope="module")
def llama_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture Llama re-saved in several shards, in fp32 and bf16."""
    root = tmp_path_factory.mktemp("bases")
    for name, dtype in DTYPES.items():
        model = transformers.LlamaForCausalLM.from_pretrained(FIXTURES / "tiny-llama", dtype=dtype)
        model.save_pretrained(root / name, max_shard_size="150KB")
        assert len(Checkpoint(root / name).headers) >= 2
    return {name: root / name for name in DTYPES}


def peft_adapter(base: Path, out: Path, model_cls: Any, seed: int, **lora: Any) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model_cls.from_pretrained(base), LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, model_cls: Any, dtype: torch.dtype) -> Any:
    from peft import PeftModel

    model = PeftModel.from_pretrained(model_cls.from_pretrained(base, dtype=dtype), adapter)
    return model.merge_and_unload()


def assert_matches_peft(ours: Path, peft_model: Any, dtype: torch.dtype, exact: bool = False) -> None:
    want = peft_model.state_dict()
    with Checkpoint(ours) as ckpt:
        assert set(ckpt.names) <= set(want)
        for name in ckpt.names:
            got, ref = ckpt.get(name), want[name].detach()
            assert got.dtype == ref.dtype == dtype, name
            if exact:
                assert torch.equal(got, ref), (name, int((got != ref).sum()))
            elif dtype == torch.float32:
                err = (got - ref).abs().max().item()
                assert err <= 1e-6 * ref.abs().max().item(), (name, err)
            else:
                up, down = (
                    torch.nextafter(ref, ref.new_tensor(torch.inf)),
                    torch.nextafter(ref, ref.new_tensor(-torch.inf)),
                )
                assert bool(((got >= down) & (got <= up)).all()), name


def assert_same_logits(ours: Path, peft_model: Any, model_cls: Any, dtype: torch.dtype) -> None:
    merged = model_cls.from_pretrained(ours, dtype=dtype)
    with torch.no_grad():
        got, want = merged(TOKENS).logits.float(), peft_model(TOKENS).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("adapter", ["tiny-qv", "tiny-patterns", "tiny-dora"])
def test_fixture_adapters_match_peft(llama_bases: dict[str, Path], tmp_path: Path, adapter: str, dtype: str) -> None:
    path = FIXTURES / "adapters" / adapter
    report = merge(llama_bases[dtype], [path], tmp_path / "out")
    assert len(report.shards) >= 2
    reference = peft_merged(llama_bases[dtype], path, transformers.LlamaForCausalLM, DTYPES[dtype])
    assert_matches_peft(tmp_path / "out", reference, DTYPES[dtype], exact=adapter != "tiny-dora")
    assert_same_logits(tmp_path / "out", reference, transformers.LlamaForCausalLM, DTYPES[dtype])


def test_embedding_lora_matches_peft(llama_bases: dict[str, Path], tmp_path: Path) -> None:
    base = llama_bases["fp32"]
    adapter = peft_adapter(base, tmp_path / "a", transformers.LlamaForCausalLM, 4, r=4, lora_alpha=8,
                           target_modules=["embed_tokens", "lm_head", "down_proj"])  # fmt: skip
    merge(base, [adapter], tmp_path / "out")
    reference = peft_merged(base, adapter, transformers.LlamaForCausalLM, torch.float32)
    assert_matches_peft(tmp_path / "out", reference, torch.float32, exact=True)


@pytest.mark.parametrize("dora", [False, True])
def test_gpt2_conv1d_matches_peft(tmp_path: Path, dora: bool) -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=32)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    adapter = peft_adapter(tmp_path / "base", tmp_path / "a", transformers.GPT2LMHeadModel, 5, r=4, lora_alpha=8,
                           target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, use_dora=dora)  # fmt: skip
    merge(tmp_path / "base", [adapter], tmp_path / "out")
    reference = peft_merged(tmp_path / "base", adapter, transformers.GPT2LMHeadModel, torch.float32)
    assert_matches_peft(tmp_path / "out", reference, torch.float32, exact=not dora)
    assert_same_logits(tmp_path / "out", reference, transformers.GPT2LMHeadModel, torch.float32)


def test_untied_head_gives_peft_logits(tmp_path: Path) -> None:
    """LoRA on the lm_head of a tied Llama: PEFT adapts the head only; the untied merge must do the same."""
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    with Checkpoint(tmp_path / "base") as ckpt:
        assert "lm_head.weight" not in ckpt
    adapter = peft_adapter(tmp_path / "base", tmp_path / "a", transformers.LlamaForCausalLM, 6, r=4, lora_alpha=8,
                           target_modules=["q_proj", "lm_head"])  # fmt: skip
    report = merge(tmp_path / "base", [adapter], tmp_path / "out")
    assert report.plan.untied == ["lm_head.weight"]
    from peft import PeftModel

    base_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    unmerged = PeftModel.from_pretrained(base_model, adapter)
    assert_same_logits(tmp_path / "out", unmerged, transformers.LlamaForCausalLM, torch.float32)
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert not merged.config.tie_word_embeddings
    emb = base_model.get_input_embeddings().weight
    assert torch.equal(merged.get_input_embeddings().weight, emb)


class _TwoLinears(torch.nn.Module):
    """A bare model for PEFT: two linear layers whose row counts leave odd-sized last blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(40, 50, bias=False)
        self.b = torch.nn.Linear(40, 31, bias=False)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("rank", "alpha"), [(4, 8), (3, 4)], ids=["scale-2", "scale-4/3"])
def test_row_blocks_are_bit_identical_to_peft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, rank: int, alpha: int
) -> None:
    """Blocks of a few rows, a last block that would be 1–3 rows (MKL rounds such small products
    otherwise), and a scale that is not a power of two: every element equal to PEFT's, in float32
    (where every rounding shows) and in bf16."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from loractl.io.safetensors_writer import save_tensors
    from loractl.ops import merge_kernel

    monkeypatch.setattr(merge_kernel, "BLOCK_ELEMENTS", 3 * 40)  # 3-row steps: 50 = 16·3 + 2, 31 = 10·3 + 1
    torch.manual_seed(7)
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["a", "b"], init_lora_weights=False)
    peft_model = get_peft_model(_TwoLinears(), lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    base = peft_model.get_base_model()
    (tmp_path / "base").mkdir()
    weights = {n: getattr(base, n).base_layer.weight.detach().to(DTYPES[dtype]) for n in ("a", "b")}
    save_tensors(tmp_path / "base" / "model.safetensors", {f"{n}.weight": w for n, w in weights.items()})
    merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "out")

    fresh = _TwoLinears().to(DTYPES[dtype])
    fresh.load_state_dict({f"{n}.weight": w for n, w in weights.items()})
    want = PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload()
    with Checkpoint(tmp_path / "out") as ckpt:
        for n in ("a", "b"):
            got, ref = ckpt.get(f"{n}.weight"), getattr(want, n).weight.detach()
            assert got.dtype == ref.dtype and torch.equal(got, ref), (n, int((got != ref).sum()))
