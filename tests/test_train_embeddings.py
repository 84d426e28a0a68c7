"""LoRA on embeddings, modules trained in full (modules_to_save), new tokens, tied embeddings: against PEFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft_twins import FIXTURES, TARGETS, TINY, config, ours_vs_peft
from torch import nn

from loractl.errors import UsageError
from loractl.train import TrainConfig, inject, train_adapter
from loractl.train.base import load_base
from loractl.train.data import collate, load_dataset

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama with its head tied to the input embeddings (the checkpoint holds no lm_head.weight)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tied")
    for f in TINY.iterdir():
        shutil.copy(f, out / f.name)
    doc = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**doc, "tie_word_embeddings": True}))
    tensors = load_file(out / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_embedding_lora_and_a_trained_head_take_peft_s_steps() -> None:
    cfg = config(targets=("embed_tokens", *TARGETS), train_modules=("lm_head",))
    ours, theirs = ours_vs_peft(
        cfg, lora={"target_modules": ["embed_tokens", *TARGETS], "modules_to_save": ["lm_head"]}
    )
    assert ours[-1] < 0.8 * ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=0)


@pytest.mark.parametrize("train_modules", [("lm_head",), ("embed_tokens", "lm_head")])
def test_tied_head_is_trained_as_an_untied_copy_as_peft_does(tied: Path, train_modules: tuple[str, ...]) -> None:
    cfg = config(train_modules=train_modules)
    ours, theirs = ours_vs_peft(cfg, base=tied, lora={"modules_to_save": list(train_modules)})
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=0)
    model, _ = load_base(tied)
    before = model.model.embed_tokens.weight.detach().clone()
    inject(model, cfg)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.lm_head.weight.requires_grad
    assert model.model.embed_tokens.weight.requires_grad == ("embed_tokens" in train_modules)
    assert torch.equal(model.model.embed_tokens.weight, before)


def eval_loss_of_peft(
    adapter: Path, base: nn.Module, tokenizer: Any, data: Path = FIXTURES / "data" / "eval.jsonl"
) -> float:
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    rows = load_dataset(data, tokenizer, 512).examples
    batch = collate(rows, tokenizer.pad_token_id or 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:].flatten()
    return float(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels, ignore_index=-100))


def test_adapter_with_embedding_lora_and_saved_head_loads_in_peft_and_merges(tmp_path: Path) -> None:
    from loractl.formats import load_adapter

    cfg = TrainConfig(targets=("embed_tokens", "q_proj", "v_proj"), train_modules=("lm_head",), rank=4, lr=1e-2,
                      steps=3, batch_size=4)  # fmt: skip
    data = FIXTURES / "data"
    summary = train_adapter(TINY, data / "train.jsonl", tmp_path / "out", cfg, eval_data=data / "eval.jsonl")
    doc = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert doc["modules_to_save"] == ["lm_head"] and "model.embed_tokens" in doc["target_modules"]
    adapter = load_adapter(tmp_path / "out")
    assert adapter.modules["model.embed_tokens"].kind == "embedding"
    assert set(adapter.full_tensors) == {"lm_head.weight"}
    base, tokenizer = load_base(TINY)
    assert summary.result.eval_loss is not None
    loss = eval_loss_of_peft(tmp_path / "out", base, tokenizer)
    assert abs(loss - summary.result.eval_loss) < 1e-5 * loss
    assert_merge_is_peft_s(tmp_path / "out", TINY, tmp_path / "merged")
    from loractl.validation import validate_adapter

    assert validate_adapter(tmp_path / "out", base=TINY).findings == []


def assert_merge_is_peft_s(adapter: Path, base: Path, output: Path) -> None:
    from loractl.io.checkpoint import Checkpoint
    from loractl.ops.merge import merge

    merge(base, [adapter], output)
    want = dict(peft.PeftModel.from_pretrained(load_base(base)[0], adapter).merge_and_unload().named_parameters())
    with Checkpoint(output) as merged:
        for name, ref in want.items():
            torch.testing.assert_close(merged.get(name), ref.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_added_tokens_resize_and_save_the_embeddings_and_tokenizer(tmp_path: Path) -> None:
    rows = [{"text": f"<|tool|> call {i} <|end_tool|> done"} for i in range(8)]
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(targets=("q_proj", "v_proj"), train_modules=("embed_tokens", "lm_head"), rank=4, lr=1e-2,
                      steps=3, batch_size=4, add_tokens=("<|tool|>", "<|end_tool|>"))  # fmt: skip
    data = tmp_path / "tools.jsonl"
    summary = train_adapter(TINY, data, tmp_path / "out", cfg, eval_data=data)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    vocab = len(AutoTokenizer.from_pretrained(TINY)) + 2
    assert len(tokenizer) == vocab and tokenizer.convert_tokens_to_ids("<|tool|>") == vocab - 2
    from loractl.formats import load_adapter

    adapter = load_adapter(tmp_path / "out")
    assert {k: tuple(t.shape) for k, t in adapter.full_tensors.items()} == {
        "model.embed_tokens.weight": (vocab, 64), "lm_head.weight": (vocab, 64)}  # fmt: skip
    base, _ = load_base(TINY)
    base.resize_token_embeddings(len(tokenizer))  # what a PEFT user does before loading such an adapter
    assert vocab - 2 in tokenizer.encode(rows[0]["text"])
    loss = eval_loss_of_peft(tmp_path / "out", base, tokenizer, data)
    assert summary.result.eval_loss is not None
    assert abs(loss - summary.result.eval_loss) < 1e-5 * loss
    assert_merge_grows_the_vocabulary_as_peft_does(tmp_path / "out", TINY, tmp_path / "merged", vocab)
    from loractl.validation import validate_adapter

    findings = validate_adapter(tmp_path / "out", base=TINY).findings
    assert sorted((f.severity, f.code) for f in findings) == [("warning", "vocab-resized")] * 2
    assert f"has {vocab} rows where the base has 256" in findings[0].message


def assert_merge_grows_the_vocabulary_as_peft_does(adapter: Path, base: Path, output: Path, vocab: int) -> None:
    """`loractl merge` gives PEFT's resize_token_embeddings + merge_and_unload, vocab_size and tokenizer included."""
    from transformers import AutoConfig, AutoTokenizer

    from loractl.io.checkpoint import Checkpoint
    from loractl.ops.merge import merge

    merge(base, [adapter], output)
    model = load_base(base)[0]
    model.resize_token_embeddings(vocab)  # its new rows are drawn, then replaced by the adapter's saved tensors
    want = dict(peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().named_parameters())
    with Checkpoint(output) as merged:
        assert merged.info("model.embed_tokens.weight").shape == (vocab, 64)
        for name, ref in want.items():
            torch.testing.assert_close(merged.get(name), ref.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert AutoConfig.from_pretrained(output).vocab_size == vocab
    assert len(AutoTokenizer.from_pretrained(output)) == vocab  # the adapter's tokenizer, with the new tokens


def test_merge_grows_a_tied_base_s_vocabulary_as_peft_does(tmp_path: Path, tied: Path) -> None:
    from loractl.io.checkpoint import Checkpoint
    from loractl.ops.merge import merge
    from loractl.ops.merge_plan import MergePlanError

    rows = [{"text": f"<|tool|> call {i} done"} for i in range(4)]
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(targets=("q_proj", "v_proj"), rank=4, steps=1, batch_size=4, add_tokens=("<|tool|>",))
    train_adapter(tied, tmp_path / "tools.jsonl", tmp_path / "out", cfg)
    merge(tied, [tmp_path / "out"], tmp_path / "merged")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tmp_path / "out"))
    model = load_base(tied)[0]
    model.resize_token_embeddings(vocab)
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "out").merge_and_unload()
    with Checkpoint(tmp_path / "merged") as merged:  # the head written untied (the same values), as merge unties
        for name, ref in [*peft_model.named_parameters(), ("lm_head.weight", peft_model.lm_head.weight)]:
            torch.testing.assert_close(merged.get(name), ref.detach(), rtol=1e-5, atol=1e-6, msg=name)
    doc = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (doc["vocab_size"], doc["tie_word_embeddings"]) == (vocab, False)

    # The same adapter without its tokenizer (pulled from a registry that lost it, copied by hand): the merged
    # model would carry the base's tokenizer, which lacks the new token: refused, nothing written.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "out" / name, bare / name)
    with pytest.raises(MergePlanError, match=f"grows the vocabulary to {vocab} rows but no tokenizer is saved"):
        merge(tied, [bare], tmp_path / "merged-bare")
    assert not (tmp_path / "merged-bare").exists()


def test_merge_refuses_a_vocabulary_grown_in_half(tmp_path: Path) -> None:
    """An adapter growing the embeddings but not the untied head would leave the model half resized."""
    from safetensors.torch import load_file, save_file

    from loractl.ops.merge import merge
    from loractl.ops.merge_plan import MergePlanError

    weights = load_file(TINY / "model.safetensors")
    cfg = TrainConfig(targets=("q_proj",), rank=2, steps=1, batch_size=2)
    train_adapter(TINY, FIXTURES / "data" / "train.jsonl", tmp_path / "b", cfg)
    tensors = load_file(tmp_path / "b" / "adapter_model.safetensors")
    grown = torch.cat([weights["model.embed_tokens.weight"], torch.zeros(3, 64)])
    save_file({**tensors, "base_model.model.model.embed_tokens.weight": grown},
              tmp_path / "b" / "adapter_model.safetensors")  # fmt: skip
    with pytest.raises(MergePlanError, match=r"grows the vocabulary to 259 rows but not 'lm_head.weight'"):
        merge(TINY, [tmp_path / "b"], tmp_path / "merged")


def test_refusals() -> None:
    model, _ = load_base(TINY)
    with pytest.raises(UsageError, match="matches no module"):
        inject(model, TrainConfig(train_modules=("lm_hed",)))
    with pytest.raises(UsageError, match="both a LoRA target and trained in full"):
        inject(load_base(TINY)[0], TrainConfig(targets=("q_proj",), train_modules=("q_proj",)))
    with pytest.raises(UsageError, match="--dora on the embedding"):
        inject(load_base(TINY)[0], TrainConfig(targets=("embed_tokens",), dora=True))
    with pytest.raises(UsageError, match="--fsdp adapts linear layers only"):
        inject(load_base(TINY)[0], TrainConfig(targets=("embed_tokens",), fsdp=True))
    with pytest.raises(UsageError, match="--fsdp trains LoRA layers only"):
        TrainConfig(fsdp=True, train_modules=("lm_head",)).check()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_chat_template_s_missing_tokens_are_added_and_saved_with_it(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    (tmp_path / "chatml.jinja").write_text(CHATML)
    cfg = TrainConfig(targets=("q_proj",), train_modules=("embed_tokens", "lm_head"), rank=4, steps=2, batch_size=2,
                      chat_template=str(tmp_path / "chatml.jinja"))  # fmt: skip
    summary = train_adapter(TINY, FIXTURES / "data" / "chat.jsonl", tmp_path / "out", cfg)
    base = AutoTokenizer.from_pretrained(TINY)
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert "<|im_start|>" not in base.get_vocab() and saved.chat_template == CHATML
    assert len(saved) == len(base) + 2 and saved.tokenize("<|im_start|>user") == [
        "<|im_start|>",
        *base.tokenize("user"),
    ]
    assert summary.result.steps == 2
    from loractl.formats import load_adapter

    assert load_adapter(tmp_path / "out").full_tensors["lm_head.weight"].shape[0] == len(base) + 2
