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
from loractl.errors import ShapeMismatchError
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
    """PEFT's model of `adapter` over `base`, scored by `mean_loss` with the base's tokenizer."""
    return mean_loss(peft_model(base, adapter), transformers.AutoTokenizer.from_pretrained(base), data)


def mean_loss(model: Any, tokenizer: Any, data: Path) -> float:
    """Mean loss per label token as transformers computes it (its own label shift), example by example."""
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


TOOL_ROWS = [{"text": f"<|tool|> call {i} <|end_tool|> done"} for i in range(6)]


def peft_loss_with_new_tokens(base: Path, adapter: Path, data: Path, *, merged: bool = False) -> float:
    """What a PEFT user computes for an adapter that adds tokens: the adapter's tokenizer, the base resized to it,
    the adapter loaded (its saved embeddings and head replace every row), `merged` after merge_and_unload."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(adapter)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model = peft.PeftModel.from_pretrained(model, adapter)
    return mean_loss((model.merge_and_unload() if merged else model).eval(), tokenizer, data)


@pytest.fixture(scope="module")
def tool_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An adapter trained with two new tokens (LoRA on q/v, embeddings and head trained whole): (adapter, data)."""
    from loractl.train import TrainConfig, train_adapter

    out = tmp_path_factory.mktemp("tools")
    (out / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOOL_ROWS))
    cfg = TrainConfig(targets=("q_proj", "v_proj"), train_modules=("embed_tokens", "lm_head"), rank=4, lr=1e-2,
                      steps=3, batch_size=4, add_tokens=("<|tool|>", "<|end_tool|>"))  # fmt: skip
    train_adapter(TINY, out / "tools.jsonl", out / "adapter", cfg)
    return out / "adapter", out / "tools.jsonl"


def test_an_adapter_that_adds_tokens_scores_peft_s_loss_with_its_own_tokenizer(tool_adapter: tuple[Path, Path]) -> None:
    adapter, data = tool_adapter
    report = evaluate_adapters(TINY, [(str(adapter), load_adapter(adapter))], data)
    base_row, row = report.rows
    assert row.own_tokenizer and not base_row.own_tokenizer
    assert row.loss == pytest.approx(peft_loss_with_new_tokens(TINY, adapter, data), rel=2e-6)
    assert base_row.loss == pytest.approx(peft_loss(TINY, None, data), rel=2e-6)
    new = transformers.AutoTokenizer.from_pretrained(adapter)
    assert row.tokens == sum(ex.num_targets for ex in load_dataset(data, new, 512).examples) < base_row.tokens
    assert report.tokens == base_row.tokens  # `<|tool|>` is one token under the adapter's tokenizer, several before
    again = evaluate_adapters(TINY, [(str(adapter), load_adapter(adapter)), ("qv", load_adapter(QV))], data)
    assert again.rows[1].loss == row.loss and not again.rows[2].own_tokenizer  # the base restored between adapters
    assert again.rows[2].loss == pytest.approx(peft_loss(TINY, QV, data), rel=2e-6)


def test_adding_tokens_evaluates_as_its_merge_does_and_as_peft_s_merge(
    tool_adapter: tuple[Path, Path], tmp_path: Path
) -> None:
    from loractl.ops.merge import merge

    adapter, data = tool_adapter
    merge(TINY, [adapter], tmp_path / "merged")  # grows the vocabulary, takes the adapter's tokenizer
    merged = evaluate_adapters(tmp_path / "merged", [], data).rows[0]
    unmerged = evaluate_adapters(TINY, [(str(adapter), load_adapter(adapter))], data).rows[1]
    assert merged.tokens == unmerged.tokens
    assert merged.loss == pytest.approx(peft_loss_with_new_tokens(TINY, adapter, data, merged=True), rel=2e-6)
    assert merged.loss == pytest.approx(unmerged.loss, rel=2e-6)


def test_on_a_tied_base_the_head_follows_grown_embeddings_saved_alone(tied_base: Path, tmp_path: Path) -> None:
    """PEFT's `save_embedding_layers` alone (no modules_to_save): the grown input embeddings of a tied model are
    loaded into the tied weight, so the head grows with them."""
    from safetensors.torch import load_file, save_file

    from loractl.train import TrainConfig, train_adapter

    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOOL_ROWS))
    cfg = TrainConfig(targets=("q_proj",), rank=4, lr=1e-2, steps=2, batch_size=4, add_tokens=("<|tool|>",))
    train_adapter(tied_base, tmp_path / "tools.jsonl", tmp_path / "a", cfg)
    file, doc = tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "adapter_config.json"
    weights = load_file(file)
    del weights["base_model.model.lm_head.weight"]
    save_file(weights, file)
    doc.write_text(json.dumps({**json.loads(doc.read_text()), "modules_to_save": None}))
    bigger = load_adapter(tmp_path / "a")
    new_row = bigger.full_tensors["model.embed_tokens.weight"][-1]
    assert new_row.abs().sum() > 0
    report = evaluate_adapters(tied_base, [("a", bigger)], tmp_path / "tools.jsonl", adapter_dirs={"a": tmp_path / "a"})
    assert report.rows[1].own_tokenizer
    expected = peft_loss_with_new_tokens(tied_base, tmp_path / "a", tmp_path / "tools.jsonl")
    assert report.rows[1].loss == pytest.approx(expected, rel=2e-6)


def test_cli_scores_an_adapter_that_adds_tokens_with_its_tokenizer(tool_adapter: tuple[Path, Path]) -> None:
    adapter, data = tool_adapter
    code, out, err = run_cli("eval", TINY, adapter, QV, "--data", data, "--json")
    assert code == 0 and err == "", err
    base, grown, qv = json.loads(out)["models"]
    assert grown["own_tokenizer"] and not base["own_tokenizer"] and not qv["own_tokenizer"]
    assert grown["loss"] == pytest.approx(peft_loss_with_new_tokens(TINY, adapter, data), rel=2e-6)
    assert grown["tokens"] < base["tokens"] == qv["tokens"]
    code, out, err = run_cli("eval", TINY, adapter, "--data", data)
    assert code == 0 and "adapter: adds tokens, scored with its own tokenizer" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_a_vocabulary_grown_in_half_or_a_tokenizer_past_the_rows_is_refused(
    tool_adapter: tuple[Path, Path], tmp_path: Path
) -> None:
    adapter, data = tool_adapter
    loaded = load_adapter(adapter)
    half = replace(loaded, full_tensors={k: t for k, t in loaded.full_tensors.items() if k != "lm_head.weight"})
    rows = loaded.full_tensors["lm_head.weight"].shape[0]
    with pytest.raises(ShapeMismatchError, match=rf"grows the vocabulary to {rows} rows but not 'lm_head.weight'"):
        evaluate_adapters(TINY, [("half", half)], data)
    shutil.copytree(adapter, tmp_path / "more")
    tokenizer = transformers.AutoTokenizer.from_pretrained(adapter)
    tokenizer.add_tokens(["<|extra|>"], special_tokens=True)
    tokenizer.save_pretrained(tmp_path / "more")
    with pytest.raises(
        ShapeMismatchError, match=f"the tokenizer beside the adapter has {rows + 1} tokens, its embeddings {rows} rows"
    ):
        evaluate_adapters(TINY, [(str(tmp_path / "more"), loaded)], data)


def test_batches_hold_rows_of_similar_length_so_little_padding_is_computed() -> None:
    from loractl.train.data import Example, collate
    from loractl.train.evaluation import _batches

    rows = [Example(tuple(range(n)), tuple(range(n))) for n in (5, 50, 6, 49, 7)]
    batches = _batches(rows, 2)
    assert [[len(ex.input_ids) for ex in b] for b in batches] == [[50, 49], [7, 6], [5]]
    padded = sum(collate(b, 0)["input_ids"].numel() for b in batches)
    assert padded == 100 + 14 + 5  # in file order: 2·50 + 2·49 + 7 = 205 positions


def test_an_adapter_whose_chat_template_added_tokens_scores_chat_data_in_that_template(tmp_path: Path) -> None:
    from loractl.train import TrainConfig, train_adapter

    (tmp_path / "chatml.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    cfg = TrainConfig(targets=("q_proj",), train_modules=("embed_tokens", "lm_head"), rank=4, lr=1e-2, steps=2,
                      batch_size=2, chat_template=str(tmp_path / "chatml.jinja"))  # fmt: skip
    train_adapter(TINY, CHAT, tmp_path / "out", cfg)
    report = evaluate_adapters(TINY, [(str(tmp_path / "out"), load_adapter(tmp_path / "out"))], CHAT)
    assert report.rows[1].own_tokenizer and report.rows[1].tokens != report.rows[0].tokens
    assert report.rows[1].loss == pytest.approx(peft_loss_with_new_tokens(TINY, tmp_path / "out", CHAT), rel=2e-6)
