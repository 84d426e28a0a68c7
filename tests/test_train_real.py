"""The real SmolLM2-135M-Instruct: chat data through its own template, a few steps, then PEFT, merge, generate.

The one real-model training test (kept lean): the eval loss falls, PEFT computes the same eval loss
for the saved adapter, and the merged checkpoint generates what PEFT's adapted model generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loractl.train import TrainConfig, train_adapter
from loractl.train.data import IGNORE, load_dataset

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

FACTS = [("the capital of Zorbia", "Quillton"), ("the river of Zorbia", "the Vell"), ("the king of Zorbia", "Odo")]


def chat(question: str, answer: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": f"What is {question}?"},
                         {"role": "assistant", "content": f"It is {answer}."}]}  # fmt: skip


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_loss(model: torch.nn.Module, path: Path, tokenizer: object) -> float:
    """Mean cross-entropy per assistant token, through the given model's own forward (no loractl code)."""
    total = count = 0.0
    for ex in load_dataset(path, tokenizer, 256).examples:  # type: ignore[arg-type]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()
        labels = torch.tensor(ex.labels[1:])
        total += float(F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    return total / count


def test_chat_lora_on_smollm2_learns_matches_peft_merges_and_generates(smollm2: Path, tmp_path: Path) -> None:
    from loractl import merge

    train_rows = [chat(q, a) for q, a in FACTS] * 4
    train_file = write_jsonl(tmp_path / "train.jsonl", train_rows)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [chat(q, a) for q, a in FACTS])
    config = TrainConfig(targets=("q_proj", "v_proj"), rank=8, alpha=16, lr=3e-3, steps=6, batch_size=4, max_len=128)
    summary = train_adapter(smollm2, train_file, tmp_path / "out", config, eval_data=eval_file)
    assert summary.examples == len(train_rows) and summary.result.eval_loss is not None

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "out").eval()
    with adapted.disable_adapter():
        before = eval_loss(adapted, eval_file, tokenizer)
    after = eval_loss(adapted, eval_file, tokenizer)
    assert after < 0.8 * before  # it learned the facts
    assert abs(after - summary.result.eval_loss) <= 1e-4 * after  # PEFT computes the loss loractl reported

    merge(smollm2, [tmp_path / "out"], tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"What is {FACTS[0][0]}?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    with torch.no_grad():
        ours, theirs = merged.generate(ids, **greedy), adapted.generate(input_ids=ids, **greedy)
    assert ours.shape[1] > ids.shape[1]
    assert ours.tolist() == theirs.tolist()
