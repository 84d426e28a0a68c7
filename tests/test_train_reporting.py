"""`--report-to`: TensorBoard and W&B (offline) get metrics.jsonl's scalars and the run config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loractl.errors import UsageError
from loractl.train import TrainConfig, train_adapter
from loractl.train.reporting import has_wandb_key, parse_report_to

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY = FIXTURES / "tiny-llama"
DATA = FIXTURES / "data"
CONFIG = TrainConfig(rank=2, steps=3, batch_size=2, eval_every=2, lr=1e-2)


def logged(run_dir: Path) -> tuple[dict[str, dict[int, float]], list[dict[str, float]]]:
    """metrics.jsonl as {scalar name: {step: value}} in the reporters' names, and its raw lines."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want: dict[str, dict[int, float]] = {}
    for doc in lines:
        for key, value in doc.items():
            if key != "step":
                name = "eval/loss" if key == "eval_loss" else f"train/{key}"
                want.setdefault(name, {})[doc["step"]] = value
    return want, lines


def test_report_to_parsing() -> None:
    assert parse_report_to("none") == () and parse_report_to(None) == ()
    assert parse_report_to("tensorboard,wandb") == ("tensorboard", "wandb")
    with pytest.raises(UsageError, match="--report-to mlflow is not one of"):
        parse_report_to("mlflow")


def test_tensorboard_gets_every_scalar_of_metrics_jsonl_and_the_config(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_adapter(TINY, DATA / "train.jsonl", tmp_path / "out", CONFIG, eval_data=DATA / "eval.jsonl",
                  report_to=("tensorboard",))  # fmt: skip
    run_dir = tmp_path / "out.train"
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    want, _ = logged(run_dir)
    assert {"train/loss", "train/lr", "eval/loss"} <= set(want) and len(want["eval/loss"]) == 2  # steps 2 and 3
    assert set(events.Tags()["scalars"]) == set(want)
    for name, by_step in want.items():
        got = {e.step: e.value for e in events.Scalars(name)}
        assert got == pytest.approx(by_step, rel=1e-6), name  # float32 in the event file
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"rank": 2' in config_text and str(TINY) in config_text


def test_wandb_runs_offline_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert not has_wandb_key()
    train_adapter(TINY, DATA / "train.jsonl", tmp_path / "out", CONFIG, eval_data=DATA / "eval.jsonl",
                  report_to=("wandb",))  # fmt: skip
    run_dir = tmp_path / "out.train"
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    want, _ = logged(run_dir)
    history = read_offline_history(runs[0])
    for name, by_step in want.items():
        assert {s: row[name] for s, row in history.items() if name in row} == pytest.approx(by_step, rel=1e-9), name
    config = read_offline_config(runs[0])
    assert config["rank"] == 2 and config["base"] == str(TINY)


def _records(run: Path) -> list[object]:
    """The protobuf records of an offline run's .wandb file (a 7-byte header, then leveldb-log blocks of
    32 KiB: records of checksum (4), length (2), type (1: full, 2: first, 3: middle, 4: last), data)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def read_offline_history(run: Path) -> dict[int, dict[str, float]]:
    """The logged rows of an offline run's .wandb file, by step."""
    rows: dict[int, dict[str, float]] = {}
    for record in _records(run):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            rows.setdefault(int(items.pop("_step")), {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")}
            )
    return rows


def read_offline_config(run: Path) -> dict[str, object]:
    config: dict[str, object] = {}
    for record in _records(run):
        kind = record.WhichOneof("record_type")
        for item in record.run.config.update if kind == "run" else record.config.update if kind == "config" else ():
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config
