"""eval: the losses equal transformers + PEFT on the same adapter and tokens (tiny Llama and the real
SmolLM2 with chat data), a perturbed adapter does not, greedy completions match PEFT's, bad input."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from loractl.adapter import Adapter, AdapterMeta, LoraModule
from loractl.formats import load_adapter, save_adapter
from loractl.io.checkpoint import Checkpoint, touched_weight_names
from loractl.train.data import load_dataset
from loractl.train.evaluation import evaluate_adapters
from tests.helpers import run_cli, tensors

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny-llama"
QV, PATTERNS = ROOT / "fixtures" / "adapters" / "tiny-qv", ROOT / "fixtures" / "adapters" / "tiny-patterns"
CHAT, TEXT = ROOT / "fixtures" / "data" / "chat.jsonl", ROOT / "fixtures" / "data" / "eval.jsonl"


def peft_model(base: Path, adapter: Path | None) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return (peft.PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def peft_loss(base: Path, adapter: Path | None, data: Path) -> float:
    """Mean loss per label token as transformers computes it (its own label shift), example by example."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = peft_model(base, adapter)
    total = count = 0.0
    with torch.no_grad():
        for ex in load_dataset(data, tokenizer, 512).examples:
            out = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
            total += float(out.loss) * ex.num_targets
            count += ex.num_targets
    return total / count


@pytest.mark.parametrize("data", [TEXT, CHAT])
def test_losses_equal_peft_on_the_tiny_llama(data: Path) -> None:
    report = evaluate_adapters(TINY, [("qv", load_adapter(QV)), ("patterns", load_adapter(PATTERNS))], data)
    expected = [peft_loss(TINY, None, data), peft_loss(TINY, QV, data), peft_loss(TINY, PATTERNS, data)]
    assert [r.loss for r in report.rows] == pytest.approx(expected, rel=2e-6)
    assert report.rows[1].perplexity == pytest.approx(math.exp(expected[1]), rel=2e-6)
    assert len({round(r.loss, 4) for r in report.rows}) == 3  # the adapters do change the loss


def test_a_perturbed_adapter_is_caught() -> None:
    # the control: one factor changed by a little must move the loss off PEFT's figure for the real file
    adapter = load_adapter(QV)
    name = sorted(adapter.modules)[0]
    m = adapter.modules[name]
    bent = replace(adapter, modules={**adapter.modules, name: replace(m, B=m.B * 1.05)})
    report = evaluate_adapters(TINY, [("bent", bent)], TEXT)
    assert report.rows[1].loss != pytest.approx(peft_loss(TINY, QV, TEXT), rel=2e-6)


def test_prompt_completion_equals_peft_greedy_generation() -> None:
    report = evaluate_adapters(TINY, [("qv", load_adapter(QV))], TEXT, prompt="The fox", max_new_tokens=6,
                               chat_template=False)  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY)
    ids = torch.tensor([tokenizer.encode("The fox", add_special_tokens=True)])
    for row, adapter in zip(report.rows, (None, QV), strict=True):
        out = peft_model(TINY, adapter).generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        assert row.completion == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _smollm2_adapter(path: Path, seed: int = 0) -> Path:
    """A random q/v LoRA for SmolLM2-135M (hidden 576, 3 kv heads of 64), large enough to move the loss."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in (0, 5, 10):
        for proj, out in (("q_proj", 576), ("v_proj", 192)):
            modules[f"model.layers.{layer}.self_attn.{proj}"] = LoraModule(
                A=torch.randn(4, 576, generator=g) * 0.05, B=torch.randn(out, 4, generator=g) * 0.05,
                scale=2.0, alpha=8.0)  # fmt: skip
    save_adapter(Adapter(modules=modules, meta=AdapterMeta(task_type="CAUSAL_LM")), path)
    return path


def test_losses_equal_peft_on_the_real_smollm2_with_chat_data(smollm2: Path, tmp_path: Path) -> None:
    adapter = _smollm2_adapter(tmp_path / "lora")
    report = evaluate_adapters(smollm2, [("lora", load_adapter(adapter))], CHAT, prompt="What is LoRA?",
                               max_new_tokens=4)  # fmt: skip
    assert [r.loss for r in report.rows] == pytest.approx(
        [peft_loss(smollm2, None, CHAT), peft_loss(smollm2, adapter, CHAT)], rel=2e-5
    )
    assert report.rows[0].loss != pytest.approx(report.rows[1].loss, rel=1e-3)
    assert all(r.completion for r in report.rows)


def test_cli_json_registry_version_and_progress_quiet_when_piped(tmp_path: Path) -> None:
    repo = f"file://{tmp_path}/registry/alice/lora"
    assert run_cli("push", QV, repo, "--create", "--tag", "v1")[0] == 0
    code, out, err = run_cli("eval", TINY, f"{repo}@v1", QV, "--data", TEXT, "--json")
    assert code == 0 and err == "", err
    doc = json.loads(out)
    assert [m["name"] for m in doc["models"]] == ["base", f"{repo}@v1", str(QV)]
    assert doc["models"][1]["loss"] == doc["models"][2]["loss"]  # the pulled version is the same adapter
    assert doc["models"][1]["delta_loss"] == pytest.approx(doc["models"][1]["loss"] - doc["models"][0]["loss"])
    code, out, _ = run_cli("eval", TINY, QV, "--data", TEXT)
    assert code == 0 and "perplexity" in out and max(len(line) for line in out.splitlines()) <= 80


def test_text_fits_80_columns_wherever_the_files_are(tmp_path: Path) -> None:
    long = tmp_path / ("d" * 120)  # a directory name wider than a line
    shutil.copytree(QV, long / "tiny-qv")
    shutil.copy(TEXT, long / "eval.jsonl")
    code, out, err = run_cli("eval", TINY, long / "tiny-qv", QV, "--data", long / "eval.jsonl")
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80 and all(line == line.rstrip() for line in lines)
    assert lines[0].startswith("…/eval.jsonl: ")
    assert "adapters/tiny-qv" in out  # two tiny-qv: each by its parent directory too


def test_bad_input_is_one_error_line_with_a_hint(tmp_path: Path) -> None:
    wrong = Adapter(modules={"model.layers.0.self_attn.q_proj": LoraModule(A=torch.ones(2, 32), B=torch.ones(32, 2),
                                                                           scale=1.0)})  # fmt: skip
    save_adapter(wrong, tmp_path / "wrong")
    for args, expected in (
        ((TINY, tmp_path / "wrong", "--data", TEXT), "adapter ΔW is 32×32 but the base layer is 64×64"),
        ((TINY, QV, "--data", tmp_path / "missing.jsonl"), "missing.jsonl does not exist"),
    ):
        code, out, err = run_cli("eval", *args)
        lines = err.strip().splitlines()
        assert code != 0 and out == "" and len(lines) == 2, err
        assert lines[0].startswith("error: ") and expected in lines[0] and lines[1].startswith("hint: ")


def test_an_adapter_made_for_another_base_is_refused_as_merge_refuses_it(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    other = tmp_path / "other"  # the same architecture, q_proj of layer 0 changed by 1%
    shutil.copytree(TINY, other)
    weights = tensors(TINY / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"] *= 1.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    adapter = load_adapter(QV)
    with Checkpoint(TINY) as ckpt:
        fingerprint = ckpt.fingerprint(touched_weight_names(adapter.modules, ckpt))
    save_adapter(replace(adapter, meta=replace(adapter.meta, base_fingerprint=fingerprint)), tmp_path / "made")
    code, out, err = run_cli("merge", other, tmp_path / "made", "-o", tmp_path / "merged")
    assert code == 1 and "made for another base" in err  # merge's verdict on the pair
    code, out, err = run_cli("eval", other, tmp_path / "made", "--data", TEXT)
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 2, err  # was: exit 0, losses of the wrong pair
    assert "the adapter was made for another base" in lines[0] and "--allow-base-mismatch" in lines[1]
    code, out, err = run_cli("eval", other, tmp_path / "made", "--data", TEXT, "--allow-base-mismatch", "--json")
    assert code == 0 and "made for another base" in err and "evaluated anyway" in err
    assert json.loads(out)["base_notes"] and len(json.loads(out)["models"]) == 2
    code, out, err = run_cli("eval", TINY, tmp_path / "made", "--data", TEXT)
    assert code == 0 and err == "", err  # its own base


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama with its head tied to the input embeddings (the checkpoint holds no lm_head.weight)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tied")
    for f in TINY.iterdir():
        shutil.copy(f, out / f.name)
    doc = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**doc, "tie_word_embeddings": True}))
    weights = load_file(out / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    ("settings", "tied"),
    [
        ({"dora": True, "targets": "all-linear"}, False),  # DoRA on every linear layer
        ({"targets": ("q_proj", "embed_tokens"), "train_modules": ("lm_head",)}, True),  # embedding LoRA, saved head
    ],
)
def test_dora_embedding_lora_and_saved_modules_score_peft_s_loss(
    settings: dict[str, Any], tied: bool, tied_base: Path, tmp_path: Path
) -> None:
    from loractl.train import TrainConfig, train_adapter

    base = tied_base if tied else TINY
    cfg = TrainConfig(rank=4, lr=1e-2, steps=2, batch_size=4, **settings)
    train_adapter(base, TEXT, tmp_path / "out", cfg)
    adapter = load_adapter(tmp_path / "out")
    assert any(m.magnitude is not None or m.kind == "embedding" for m in adapter.modules.values())
    report = evaluate_adapters(base, [("a", adapter)], TEXT)
    expected = [peft_loss(base, None, TEXT), peft_loss(base, tmp_path / "out", TEXT)]
    assert [r.loss for r in report.rows] == pytest.approx(expected, rel=2e-6)
    assert abs(expected[1] - expected[0]) > 1e-4  # the adapter changes the loss
    again = evaluate_adapters(base, [("a", adapter), ("a2", adapter)], TEXT)  # hooks and swaps undone between
    assert again.rows[1].loss == again.rows[2].loss == report.rows[1].loss
