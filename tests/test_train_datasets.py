"""`--data` through the datasets library: local parquet/csv/json/arrow files, save_to_disk, data directories,
column mapping, streaming, and an unreachable Hub. No test touches the network: every dataset is built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loractl.data_sources import DataOptions, parse_columns
from loractl.errors import FormatError, InputNotFoundError, LoractlError, UsageError
from loractl.train import TrainConfig, train_adapter
from loractl.train.data import load_dataset

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY = FIXTURES / "tiny-llama"
JSONL = FIXTURES / "data" / "train.jsonl"


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return transformers.AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, object]]:
    return [json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def renamed(tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, object]]) -> Path:
    """The fixture rows with `text` stored as `body`, as a parquet file."""
    path = tmp_path_factory.mktemp("renamed") / "rows.parquet"
    datasets.Dataset.from_list([{"body": r["text"], "id": i} for i, r in enumerate(rows)]).to_parquet(str(path))
    return path


def test_the_fixture_rows_are_text_rows(rows: list[dict[str, object]]) -> None:
    assert rows and all(set(r) == {"text"} for r in rows)  # so every format below can hold them as one column


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_data_files_give_the_examples_jsonl_gives(
    tmp_path: Path, tokenizer: object, rows: list[dict[str, object]], suffix: str
) -> None:
    data = datasets.Dataset.from_list(rows)
    path = tmp_path / f"rows{suffix}"
    {".parquet": data.to_parquet, ".csv": data.to_csv, ".json": data.to_json}[suffix](str(path))
    want = load_dataset(JSONL, tokenizer, 64)
    got = load_dataset(path, tokenizer, 64)
    assert got.examples == want.examples and got.sha256.startswith("sha256:") and got.sha256 != want.sha256


def test_saved_dataset_dict_by_split_and_streamed(
    tmp_path: Path, tokenizer: object, rows: list[dict[str, object]]
) -> None:
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:6]), test=datasets.Dataset.from_list(rows[6:]))
    splits.save_to_disk(str(tmp_path / "saved"))
    whole = load_dataset(JSONL, tokenizer, 64).examples
    assert load_dataset(tmp_path / "saved", tokenizer, 64).examples == whole[:6]
    test = load_dataset(tmp_path / "saved", tokenizer, 64, options=DataOptions(split="test", streaming=True))
    assert test.examples == whole[6:]
    with pytest.raises(UsageError, match="has no split 'valid'") as info:
        load_dataset(tmp_path / "saved", tokenizer, 64, options=DataOptions(split="valid"))
    assert "train, test" in str(info.value.hint)


def test_a_directory_of_data_files_reads_as_a_hub_repository(
    tmp_path: Path, tokenizer: object, rows: list[dict[str, object]]
) -> None:
    """A downloaded Hub dataset repository (data/train-*.parquet, data/test-*.parquet) offline, by datasets' rules."""
    (tmp_path / "repo" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows[:6]).to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[6:]).to_parquet(str(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet"))
    whole = load_dataset(JSONL, tokenizer, 64).examples
    assert load_dataset(tmp_path / "repo", tokenizer, 64).examples == whole[:6]
    assert load_dataset(tmp_path / "repo", tokenizer, 64, options=DataOptions(split="test")).examples == whole[6:]


def test_columns_are_mapped_and_unmapped_columns_are_named(renamed: Path, tokenizer: object) -> None:
    want = load_dataset(JSONL, tokenizer, 64).examples
    options = DataOptions(columns=parse_columns("text=body"))
    assert load_dataset(renamed, tokenizer, 64, options=options).examples == want
    assert (
        load_dataset(renamed, tokenizer, 64, options=DataOptions(columns=options.columns, streaming=True)).examples
        == want
    )
    with pytest.raises(
        FormatError, match=r"line 1 has none of the keys .*\(its keys: body, id; map them with --data-columns\)"
    ):
        load_dataset(renamed, tokenizer, 64)


@pytest.mark.parametrize("value", ["body", "label=body", "text="])
def test_bad_column_maps_are_refused(value: str) -> None:
    with pytest.raises(UsageError, match="is not ROLE=COLUMN"):
        parse_columns(value)


def test_missing_sources_are_refused_before_anything_loads(tmp_path: Path, tokenizer: object) -> None:
    from loractl.train.data import require_data_file

    with pytest.raises(InputNotFoundError, match="does not exist"):
        require_data_file(tmp_path / "nope.parquet")
    with pytest.raises(InputNotFoundError, match="does not exist"):
        require_data_file("data/train.jsonl")  # a missing path, not a Hub id
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError, match="holds no dataset"):
        require_data_file(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UsageError, match="is not JSONL, parquet"):
        require_data_file(tmp_path / "x.txt")


def test_a_hub_id_that_is_not_cached_offline_is_one_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tokenizer: object
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(LoractlError, match="cannot read dataset nobody/no-such-dataset") as info:
        load_dataset("nobody/no-such-dataset", tokenizer, 64)
    assert "datasets cache" in str(info.value.hint)


def test_train_on_a_parquet_dataset_records_how_it_was_read(renamed: Path, tmp_path: Path) -> None:
    from loractl.formats import load_adapter

    options = DataOptions(columns=(("text", "body"),))
    cfg = TrainConfig(rank=2, steps=1, batch_size=2)
    train_adapter(TINY, renamed, tmp_path / "out", cfg, data_options=options, eval_data=renamed)
    entry = load_adapter(tmp_path / "out").lineage[-1]
    assert entry["params"]["data"] == {"source": str(renamed), "split": "train", "config": None, "streaming": False,
                                       "columns": {"text": "body"}}  # fmt: skip
    assert entry["metrics"]["eval_loss"] is not None
