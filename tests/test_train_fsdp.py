"""`loractl train --fsdp`: two gloo processes sharding tiny-llama train the same adapter as one process; so do
two torchrun agents started as two nodes (c10d rendezvous on localhost), with DDP and with FSDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from oracles import oracle

from loractl.adapter import Adapter
from loractl.formats import load_adapter

ROOT = Path(__file__).resolve().parent.parent
_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
LR, STEPS = 1e-2, 3  # every run's


def _train_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    """`train`'s arguments for a short all-linear run on tiny-llama with eval, --json."""
    fixtures = ROOT / "fixtures"
    return ["train", "--base", str(fixtures / "tiny-llama"), "--data", str(fixtures / "data" / "train.jsonl"),
            "--eval-data", str(fixtures / "data" / "eval.jsonl"), "-o", str(tmp_path / name),
            "--targets", "all-linear", "--rank", "4", "--lr", str(LR), "--steps", str(STEPS), "--max-len", "64", "--json",
            *extra]  # fmt: skip


def _train(tmp_path: Path, name: str, *extra: str) -> dict[str, object]:
    """`loractl train` (see `_train_args`); the --json summary."""
    cmd = [sys.executable, "-m", "loractl", *_train_args(tmp_path, name, *extra)]
    done = subprocess.run(cmd, env=_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc: dict[str, object] = json.loads(done.stdout)
    return doc


def _train_on_two_nodes(tmp_path: Path, name: str, *extra: str) -> dict[str, object]:
    """Two torchrun agents, each a node of one process, meeting at a c10d rendezvous on localhost: the
    command docs/train.md gives for several machines, with HOST0 = localhost. Rank 0 prints the summary."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", name,
             "-m", "loractl", *_train_args(tmp_path, name, *extra)]  # fmt: skip
    nodes = [subprocess.Popen(agent, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    summaries = [out for out, _ in outputs if out.strip()]
    assert len(summaries) == 1  # from the agent whose process became rank 0
    doc: dict[str, object] = json.loads(summaries[0])
    return doc


def _assert_same_adapter(ours: Adapter, theirs: Adapter) -> None:
    """Equal up to float noise: each factor within 5e-4 of its norm, but for the one entry of the adapter that
    differs most, held to what AdamW can move an entry in the run (≈ lr a step). Adam scales the noise up where a
    gradient nearly cancels (|g| near its ε): such an entry moves by a share of lr that the order of the float
    sums decides (tests/test_train_loop.py's ragged test shows the mechanism). On one CPU (machine D) a single
    entry of 256 in one factor came out 6.8e-4 apart here, every other factor within 3.1e-5 of its norm."""
    assert set(ours.modules) == set(theirs.modules) and len(ours.modules) == 14  # 7 linears × 2 decoder layers
    diffs = {(name, role): getattr(ours.modules[name], role) - getattr(module, role)
             for name, module in theirs.modules.items() for role in ("A", "B")}  # fmt: skip
    worst = max(diffs, key=lambda key: float(diffs[key].abs().max()))
    outlier = diffs[worst].abs().argmax()
    assert float(diffs[worst].flatten()[outlier].abs()) <= STEPS * LR
    diffs[worst].view(-1)[outlier] = 0
    for (name, role), diff in diffs.items():
        assert float(diff.norm()) <= 5e-4 * float(getattr(theirs.modules[name], role).norm()), (name, role)
    for name, module in theirs.modules.items():
        assert ours.modules[name].scale == module.scale
    assert ours.meta.base_fingerprint == theirs.meta.base_fingerprint is not None
    assert any(m.B.abs().sum() > 0 for m in ours.modules.values())  # it did train


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path: Path) -> None:
    one = _train(tmp_path, "one", "--batch-size", "4")
    _train(tmp_path, "ddp", "--batch-size", "2", "--nproc", "2")
    two = _train(tmp_path, "two", "--batch-size", "2", "--nproc", "2", "--fsdp")
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    a, d, b = (load_adapter(tmp_path / name) for name in ("one", "ddp", "two"))
    assert set(a.modules) == set(b.modules) and len(a.modules) == 14  # 7 linear layers × 2 decoder layers
    for name, module in a.modules.items():
        # Adam turns float noise in a near-zero gradient into up to ~lr/100 of A (one process vs two, DDP too).
        torch.testing.assert_close(b.modules[name].A, module.A, rtol=1e-4, atol=5e-4)
        torch.testing.assert_close(b.modules[name].B, module.B, rtol=1e-4, atol=1e-5)
        for role in ("A", "B"):  # as DDP, up to float noise that Adam scales up in near-zero gradients (see above)
            ours, ddp = getattr(b.modules[name], role), getattr(d.modules[name], role)
            assert float((ours - ddp).norm()) <= 5e-4 * float(ddp.norm()), (name, role)
        assert b.modules[name].scale == module.scale
    assert b.meta.base_fingerprint == a.meta.base_fingerprint  # hashed unit by unit, never the whole base at once
    assert any(m.B.abs().sum() > 0 for m in b.modules.values())  # it did train


def test_fsdp_needs_a_distributed_launch(fixtures_dir: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("train", "--base", fixtures_dir / "tiny-llama", "--data",
                           fixtures_dir / "data" / "train.jsonl", "-o", tmp_path / "out", "--fsdp")  # fmt: skip
    assert code == 2 and "--fsdp needs a distributed launch" in err and "--nproc" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [("--precision", "fp16"), ("--quantize", "int8")])
def test_fsdp_refuses_what_it_cannot_do(fixtures_dir: Path, tmp_path: Path, flags: tuple[str, str]) -> None:
    code, _, err = run_cli("train", "--base", fixtures_dir / "tiny-llama", "--data",
                           fixtures_dir / "data" / "train.jsonl", "-o", tmp_path / "out", "--fsdp", *flags)  # fmt: skip
    assert code == 2 and "--fsdp" in err and flags[0].strip("-") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_lora_plus_groups_under_fsdp_match_one_process(tmp_path: Path) -> None:
    """LoRA+ reads its groups from the modules FSDP keeps (use_orig_params): the same run as one process."""
    one = _train(tmp_path, "one", "--batch-size", "4", "--lora-plus-ratio", "8")
    two = _train(tmp_path, "two", "--batch-size", "2", "--nproc", "2", "--fsdp", "--lora-plus-ratio", "8")
    plain = _train(tmp_path, "plain", "--batch-size", "4")
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert two["train_loss"] != pytest.approx(plain["train_loss"], rel=1e-5)  # the ratio changed the run
    _assert_same_adapter(load_adapter(tmp_path / "two"), load_adapter(tmp_path / "one"))


@pytest.mark.slow
def test_fsdp_checkpoint_stop_and_resume_continue_exactly(tmp_path: Path) -> None:
    """Each rank writes its shard (DCP); a run stopped at step 2 and resumed gives the straight run's adapter."""
    common = ("--batch-size", "2", "--nproc", "2", "--fsdp", "--schedule", "constant", "--save-every", "2")
    straight = _train(tmp_path, "straight", *common, "--steps", "4")
    stopped = _train(tmp_path, "resumed", *common, "--steps", "2")
    step2 = tmp_path / "resumed.train" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in step2.iterdir()) == ["adapter", "sharded", "state.pt"]
    assert len(list((step2 / "sharded").glob("*.distcp"))) == 2  # one shard file per rank
    assert stopped["steps"] == 2
    resumed = _train(tmp_path, "resumed", *common, "--steps", "4", "--resume", str(step2))
    assert resumed["steps"] == 4 and resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)
    a, b = load_adapter(tmp_path / "straight"), load_adapter(tmp_path / "resumed")
    for name, module in a.modules.items():
        torch.testing.assert_close(b.modules[name].A, module.A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.modules[name].B, module.B, rtol=1e-6, atol=1e-7)
    assert b.meta.base_fingerprint == a.meta.base_fingerprint


@pytest.mark.slow
def test_qlora_fsdp_two_processes_match_one(tmp_path: Path) -> None:
    """QLoRA-FSDP: the nf4 base's packed bytes stored as float32 (the float32 fixture's dtype) are sharded
    like any other parameter, and two processes train one process's adapter."""
    one = _train(tmp_path, "one", "--batch-size", "4", "--quantize", "nf4")
    two = _train(tmp_path, "two", "--batch-size", "2", "--nproc", "2", "--fsdp", "--quantize", "nf4")
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    _assert_same_adapter(load_adapter(tmp_path / "two"), load_adapter(tmp_path / "one"))  # fingerprint: the files'


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [(), ("--fsdp",)], ids=["ddp", "fsdp"])
def test_two_nodes_match_one_process(tmp_path: Path, fsdp: tuple[str, ...]) -> None:
    """`torchrun --nnodes 2 --nproc-per-node 1` twice on this machine (two nodes of one gloo process each)."""
    one = _train(tmp_path, "one", "--batch-size", "4")
    two = _train_on_two_nodes(tmp_path, "two", "--batch-size", "2", *fsdp)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    _assert_same_adapter(load_adapter(tmp_path / "two"), load_adapter(tmp_path / "one"))


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A gloo process group of one rank, in this process: enough for FSDP to wrap (and refuse) a model."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize(
    ("load", "fsdp_says"),
    [
        ({"quantize": "int8"}, "uniform dtype.*int8"),
        ({"dtype": "bf16"}, "uniform dtype.*bfloat16"),
        ({"quantize": "nf4"}, None),
    ],
)
def test_what_fsdp_cannot_flatten_is_refused_for_its_real_reason(load: dict[str, str], fsdp_says: str | None) -> None:
    """FSDP itself fails on an int8 base and on a bf16 base under float32 LoRA factors (one dtype per flat
    parameter), the reason loractl's refusals give; a 4-bit base stored as float32 it wraps."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from loractl.errors import UsageError
    from loractl.train import TrainConfig, inject
    from loractl.train.base import load_base
    from loractl.train.distributed import World, check_one_dtype, wrap

    oracle("bitsandbytes", "bitsandbytes", "qlora")
    model, _ = load_base(ROOT / "fixtures" / "tiny-llama", **load, for_fsdp=True)  # type: ignore[arg-type]
    inject(model, TrainConfig(targets="all-linear", rank=4))
    if fsdp_says is None:
        assert isinstance(wrap(model, World(0, 2), fsdp=True), FullyShardedDataParallel)
        return
    with pytest.raises(ValueError, match=fsdp_says):  # FSDP's own error, without loractl's check
        FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    if "dtype" in load:
        with pytest.raises(UsageError, match="needs a float32 base, but this one holds bfloat16"):
            check_one_dtype(model)
    else:
        with pytest.raises(UsageError, match="int8 weights as int8 tensors"):
            TrainConfig(fsdp=True, quantize="int8").check()
