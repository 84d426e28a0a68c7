"""JSONL → tokens and labels: loss masks, truncation, packing, and errors with line numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loractl.errors import FormatError, InputNotFoundError, UsageError
from loractl.train.data import IGNORE, Example, collate, load_dataset, pack, tokenize

transformers = pytest.importorskip("transformers")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def tok() -> object:
    return transformers.AutoTokenizer.from_pretrained(FIXTURES / "tiny-llama")


def write(tmp_path: Path, lines: list[object]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_text_takes_loss_on_every_token(tok: object) -> None:
    ex = tokenize({"text": "the lazy dog"}, tok)
    assert ex.labels == ex.input_ids
    assert ex.input_ids[-1] == tok.eos_token_id


def test_prompt_completion_takes_loss_on_the_completion_only(tok: object) -> None:
    ex = tokenize({"prompt": "Q: what? A:", "completion": " a dog"}, tok)
    n = len(tok.encode("Q: what? A:"))
    assert ex.labels[:n] == (IGNORE,) * n
    assert ex.labels[n:] == ex.input_ids[n:]
    assert tok.decode(list(ex.input_ids[n:]), skip_special_tokens=True) == " a dog"


def test_messages_take_loss_on_assistant_turns(tok: object) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}, {"role": "assistant", "content": "bye"}]  # fmt: skip
    ex = tokenize({"messages": messages}, tok)
    assert list(ex.input_ids) == tok.encode(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    learned = tok.decode([i for i, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])
    assert learned == "hello</s>bye</s>"


def test_truncation_and_dropped_lines(tmp_path: Path, tok: object) -> None:
    path = write(tmp_path, [{"text": "a long sentence about foxes and dogs"}, {"prompt": "x" * 50, "completion": "y"}])
    data = load_dataset(path, tok, max_len=8)
    assert len(data) == 1 and data.dropped == 1  # the completion was cut away entirely
    assert len(data.examples[0].input_ids) == 8
    assert data.sha256.startswith("sha256:")


def test_packing_fills_rows_and_masks_seams() -> None:
    examples = [Example((1, 2, 3), (1, 2, 3)), Example((4, 5), (4, 5)), Example((6, 7, 8, 9), (6, 7, 8, 9))]
    rows = pack(examples, max_len=5)
    assert [r.input_ids for r in rows] == [(1, 2, 3, 4, 5), (6, 7, 8, 9)]
    assert rows[0].labels == (IGNORE, 2, 3, IGNORE, 5)
    assert [r.starts for r in rows] == [(0, 3), (0,)]
    batch = collate(rows, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]  # restarted at each example


def test_unpacked_batches_have_no_position_ids() -> None:
    assert "position_ids" not in collate([Example((1, 2, 3), (1, 2, 3)), Example((4,), (4,))], pad_id=0)


def test_collate_pads_right_and_masks() -> None:
    batch = collate([Example((1, 2, 3), (1, 2, 3)), Example((4,), (4,))], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE, IGNORE]]


@pytest.mark.parametrize(
    ("lines", "error", "message"),
    [
        ([{"text": "ok"}, "{not json"], FormatError, "line 2 is not valid JSON"),
        ([{"text": "ok"}, "", {"title": "x"}], FormatError, "line 3 has none of the keys"),
        ([{"prompt": "p", "completion": 3}], FormatError, "line 1: 'completion' must be a string"),
        ([{"messages": "hi"}], FormatError, "line 1: 'messages' must be a list"),
        ([], UsageError, "no training examples"),
    ],
)
def test_bad_data_is_reported_with_its_line(tmp_path: Path, tok: object, lines: list[object],
                                            error: type[Exception], message: str) -> None:  # fmt: skip
    with pytest.raises(error, match=message):
        load_dataset(write(tmp_path, lines), tok, max_len=32)


def test_missing_file(tmp_path: Path, tok: object) -> None:
    with pytest.raises(InputNotFoundError):
        load_dataset(tmp_path / "nope.jsonl", tok, max_len=32)


def test_shipped_fixture_data_loads(tok: object) -> None:
    for name in ("train", "eval", "prompts", "chat"):
        assert len(load_dataset(FIXTURES / "data" / f"{name}.jsonl", tok, max_len=128)) > 0
