"""The loop: learning, exact resume, accumulation, determinism, precision, Ctrl-C, schedules."""

from __future__ import annotations

import copy
import os
import re
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from loractl.errors import UsageError
from loractl.train import Callback, Example, TrainConfig, adapter_from_model, evaluate, inject, train
from loractl.train.schedule import lr_at

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyLM(nn.Module):
    """A causal toy language model: embedding, a linear layer, a running mean over positions, a head."""

    def __init__(self, vocab: int = 24, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.proj, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.proj(self.emb(input_ids)))
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)
        return self.head(h)  # type: ignore[no-any-return]


def toy_data(n: int = 7) -> list[Example]:
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 24, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g) for _ in range(n)]
    return [Example(tuple(r.tolist()), tuple(r.tolist())) for r in rows]


def factors(model: nn.Module) -> dict[str, torch.Tensor]:
    adapter = adapter_from_model(model)
    return {f"{k}.{role}": t for k, m in adapter.modules.items() for role, t in m.tensors().items()} | dict(
        adapter.full_tensors
    )


def run(config: TrainConfig, **kw: Any) -> tuple[nn.Module, Any]:
    model = ToyLM()
    inject(model, config)
    return model, train(model, toy_data(), config, **kw)


class Losses(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: list[float] = []
        self.stop_at = stop_at

    def on_step(self, metrics: dict[str, Any]) -> bool | None:
        self.losses.append(metrics["loss"])
        return metrics["step"] == self.stop_at


TOY = TrainConfig(targets=("proj", "head"), rank=4, lr=5e-2, steps=8, batch_size=2, dropout=0.1, warmup=2)


@pytest.mark.parametrize(
    "config",
    [TOY, replace(TOY, dora=True), replace(TOY, dora=True, dropout=0.0),
     replace(TOY, targets=("emb", "proj"), train_modules=("head",)),
     replace(TOY, init="pissa_niter_2", lora_plus_ratio=4.0)],
    ids=["lora", "dora", "dora-fused", "embedding+head", "pissa+lora-plus"],
)  # fmt: skip
def test_resume_is_bit_exact(tmp_path: Path, config: TrainConfig) -> None:
    straight, _ = run(config)
    ckpts = tmp_path / "ckpt"
    _, first = run(config, checkpoint_dir=ckpts, callbacks=[Losses(stop_at=4)])
    assert first.interrupted and first.steps == 4 and first.checkpoint == ckpts / "step-000004"
    resumed, second = run(config, checkpoint_dir=ckpts, resume=ckpts)
    assert second.steps == 8 and not second.interrupted
    a, b = factors(straight), factors(resumed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    roles = {k.rpartition(".")[2] for k in a}
    assert ("magnitude" in roles) == config.dora and ("head.weight" in a) == bool(config.train_modules)


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    run(TOY, checkpoint_dir=tmp_path, callbacks=[Losses(stop_at=2)])
    with pytest.raises(UsageError, match=re.escape("lr 0.05 → 0.1")):
        run(replace(TOY, lr=0.1), resume=tmp_path)


def test_same_seed_same_adapter_other_seed_other_adapter() -> None:
    a, b = factors(run(TOY)[0]), factors(run(TOY)[0])
    c = factors(run(replace(TOY, seed=1))[0])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["proj.A"], c["proj.A"])


def test_gradient_accumulation_equals_a_bigger_batch() -> None:
    base = replace(TOY, dropout=0.0, batch_size=4)
    a = factors(run(base)[0])
    b = factors(run(replace(base, batch_size=2, grad_accum=2))[0])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("dora", [False, True])
def test_autocast_precisions_train(precision: str, dora: bool) -> None:
    losses = Losses()
    run(replace(TOY, precision=precision, dropout=0.0, dora=dora), callbacks=[losses])
    assert all(torch.isfinite(torch.tensor(losses.losses))) and losses.losses[-1] < losses.losses[0]


def test_ctrl_c_checkpoints_and_stops(tmp_path: Path) -> None:
    class Interrupt(Callback):
        def on_step(self, metrics: dict[str, Any]) -> bool | None:
            if metrics["step"] == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return None

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    _, result = run(TOY, checkpoint_dir=tmp_path, callbacks=[Interrupt()])
    assert result.interrupted and result.steps == 3 and (tmp_path / "step-000003" / "state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is before


def test_metrics_and_epochs() -> None:
    config = replace(TOY, steps=None, epochs=2.0)
    assert config.total_steps(len(toy_data()), world_size=1) == 7  # ceil(2 * 7 / 2)
    losses = Losses()
    _, result = run(config, callbacks=[losses])
    assert result.steps == 7 and len(losses.losses) == 7 and result.tokens > 0


def test_untrainable_model_is_refused() -> None:
    with pytest.raises(UsageError, match="no trainable parameters"):
        train(ToyLM().requires_grad_(False), toy_data(), TOY)


def test_schedules() -> None:
    cfg = TrainConfig(lr=1.0, warmup=2, steps=12)
    assert [lr_at(s, 12, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, 12, cfg) == 1.0 and lr_at(7, 12, cfg) == pytest.approx(0.5)
    linear = TrainConfig(lr=1.0, schedule="linear", steps=10)
    assert lr_at(5, 10, linear) == 0.5
    assert lr_at(9, 10, TrainConfig(lr=1.0, schedule="constant")) == 1.0


# --- the tiny Llama: learning and PEFT interop ---------------------------------------------------------------

transformers = pytest.importorskip("transformers")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, Any]:
    from loractl.train.base import load_base

    return load_base(FIXTURES / "tiny-llama")


def test_overfits_a_repeated_sentence(llama: tuple[nn.Module, Any]) -> None:
    from loractl.train.data import tokenize

    model, tok = copy.deepcopy(llama[0]), llama[1]
    ex = tokenize({"text": "LoRA adapts a frozen weight."}, tok)
    config = TrainConfig(targets="all-linear", lr=1e-2, steps=20, batch_size=1, schedule="constant", max_grad_norm=None)
    inject(model, config)
    losses = Losses()
    train(model, [ex], config, callbacks=[losses])
    assert losses.losses[-1] < 0.1 * losses.losses[0]


def test_eval_loss_falls_on_held_back_data(llama: tuple[nn.Module, Any]) -> None:
    from loractl.train.data import load_dataset

    model, tok = copy.deepcopy(llama[0]), llama[1]
    train_set = load_dataset(FIXTURES / "data" / "train.jsonl", tok, 64).examples
    eval_set = load_dataset(FIXTURES / "data" / "eval.jsonl", tok, 64).examples
    config = TrainConfig(targets="all-linear", lr=1e-2, steps=8, batch_size=2)
    inject(model, config)
    before = evaluate(model, eval_set, config)
    result = train(model, train_set, config, eval_data=eval_set)
    assert result.eval_loss is not None and result.eval_loss < 0.85 * before


def test_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path: Path, llama: tuple[nn.Module, Any]) -> None:
    peft = pytest.importorskip("peft")
    from safetensors import safe_open

    from loractl import save_adapter
    from loractl.io.checkpoint import Checkpoint

    model, tok = copy.deepcopy(llama[0]), llama[1]
    config = TrainConfig(targets=r".*\.(q_proj|o_proj|down_proj)", rank=4, alpha=8, rslora=True, lr=1e-2, steps=3,
                         batch_size=1)  # fmt: skip
    inject(model, config)
    ids = torch.tensor([tok.encode("The quick brown fox")])
    train(model, [Example(tuple(ids[0].tolist()), tuple(ids[0].tolist()))], config)
    adapter = adapter_from_model(model, base_model="tiny-llama", task_type="CAUSAL_LM")
    with Checkpoint(FIXTURES / "tiny-llama") as ckpt:
        assert adapter.meta.base_fingerprint == ckpt.fingerprint([f"{m}.weight" for m in adapter.modules])
    save_adapter(adapter, tmp_path / "out")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny-llama")
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "out").eval()
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as f:
        saved = set(f.keys())
    expected = {k.replace(".default", "") for k in peft.get_peft_model_state_dict(peft_model)}
    assert saved == expected  # no missing and no unexpected keys
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fresh.base_model(ids).last_hidden_state, llama[0].model(ids).last_hidden_state)


def test_packed_rows_attend_within_each_example(llama: tuple[nn.Module, Any]) -> None:
    import torch.nn.functional as F

    from loractl.train.data import collate, pack, tokenize
    from loractl.train.loss import CausalLMLoss

    model, tok = llama
    texts = ["The quick fox.", "A lazy dog sleeps.", "Hi there."]
    examples = [tokenize({"text": t}, tok) for t in texts]
    (row,) = pack(examples, 128)
    batch = collate([row], 0)
    with torch.no_grad():
        packed = float(CausalLMLoss(model)(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"]))
        leaky = float(CausalLMLoss(model)(batch["input_ids"], batch["labels"]))  # one sequence: attends across seams
        alone = 0.0
        for ex in examples:  # the reference: each example through the plain model on its own
            ids = torch.tensor([ex.input_ids])
            alone += float(F.cross_entropy(model(ids).logits[0, :-1], torch.tensor(ex.labels[1:]), reduction="sum"))
    assert abs(packed - alone) <= 1e-5 * alone
    assert abs(leaky - alone) > 1e-3 * alone  # the check can fail: without the restart, examples see each other


def test_gradient_checkpointing_gives_the_same_step(llama: tuple[nn.Module, Any]) -> None:
    ex = Example(tuple(range(3, 40)), tuple(range(3, 40)))
    out = []
    for checkpointing in (False, True):
        model = copy.deepcopy(llama[0])
        config = TrainConfig(grad_checkpointing=checkpointing, steps=2, batch_size=1, lr=1e-2)
        inject(model, config)
        train(model, [ex], config)
        out.append(factors(model))
    for k in out[0]:
        torch.testing.assert_close(out[0][k], out[1][k], rtol=1e-5, atol=1e-6)


def test_fused_head_loss_matches_logits_cross_entropy(llama: tuple[nn.Module, Any], monkeypatch: Any) -> None:
    import torch.nn.functional as F

    from loractl.train import loss as loss_module
    from loractl.train.data import collate

    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 7)  # several chunks, one of them partial
    model = copy.deepcopy(llama[0])
    inject(model, TrainConfig(targets="all-linear"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    batch = collate([Example(tuple(range(3, 20)), (-100,) * 5 + tuple(range(8, 20))), Example((5, 6, 7), (5, 6, 7))], 0)
    fused = loss_module.CausalLMLoss(model)
    assert fused.head is model.lm_head
    ours = fused(batch["input_ids"], batch["labels"], batch["attention_mask"])
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100).flatten()
    reference = F.cross_entropy(logits.flatten(0, 1), targets, ignore_index=-100, reduction="sum")
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():  # float32 sums in another order: rounding relative to each gradient's norm
        want = dict(model.named_parameters())[name].grad
        assert float((grad - want).norm()) <= 100 * torch.finfo(torch.float32).eps * float(want.norm()), name


def test_fused_head_works_only_at_label_positions() -> None:
    """The head's logits and its hidden-state gradient for the positions that take a loss, none other: a third
    of the positions labelled costs a third of the head's FLOPs (a full head computes all), the same loss."""
    from torch.utils.flop_counter import FlopCounterMode

    from loractl.train.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(90, 16, generator=g, requires_grad=True), torch.randn(50, 16, generator=g)
    every = torch.randint(0, 50, (90,), generator=g)
    third = torch.where(torch.arange(90) % 3 == 0, every, -100)
    flops, losses = [], []
    for targets in (every, third):
        with FlopCounterMode(display=False) as counter:
            loss = linear_cross_entropy(hidden, weight, targets)
            loss.backward()
        flops.append(counter.get_total_flops())
        losses.append(loss)
    assert flops == [2 * 2 * 90 * 16 * 50, 2 * 2 * 30 * 16 * 50]  # logits and their gradient, label rows only
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, third, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(losses[1], reference)


def test_length_groups_cover_each_row_once_and_cut_padding() -> None:
    from loractl.train import schedule

    lengths = [256, 64, 200, 90, 250, 120, 180, 70]
    groups = schedule.length_groups(list(range(10, 18)), lengths)
    assert sorted(i for g in groups for i in g) == list(range(10, 18))
    padded = sum(len(g) * max(lengths[i - 10] for i in g) for g in groups)
    assert len(groups) > 1 and padded < 8 * 256 - len(groups) * schedule.GROUP_COST_TOKENS
    assert schedule.length_groups([0, 1, 2], [50, 50, 50]) == [[0, 1, 2]]  # nothing to save: one batch


def test_ragged_rows_in_length_groups_take_the_same_steps(llama: tuple[nn.Module, Any], monkeypatch: Any) -> None:
    """Rows of 40, 8, 35 and 10 tokens (prompts unlabelled) in one micro-batch: split by length (no padding
    computed) or padded to 40, the same losses and the same gradients at every step up to the order of float sums.

    The gradients are compared, each tensor against its norm, not the factors after AdamW: an entry whose
    gradient nearly cancels (|g| near AdamW's ε, 1e-8) moves by lr · g / (|g| + ε), so the last digits of
    that sum, which depend on the order of the additions, show up 1e5-fold in the factor."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from loractl.train import schedule

    rows = [tuple(range(3, 3 + n)) for n in (40, 8, 35, 10)]
    data = [Example(r, (-100,) * (2 * len(r) // 3) + r[2 * len(r) // 3 :]) for r in rows]
    grads: list[list[torch.Tensor]] = []
    losses = []

    def record(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        grads[-1] += [p.grad.clone() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]

    hook = register_optimizer_step_pre_hook(record)
    try:
        for cost in (10**9, 4):  # one padded batch, then length groups (a toy model's forward costs little)
            monkeypatch.setattr(schedule, "GROUP_COST_TOKENS", cost)
            assert (len(schedule.length_groups([0, 1, 2, 3], [len(r) for r in rows])) > 1) == (cost == 4)
            model = copy.deepcopy(llama[0])
            config = TrainConfig(targets="all-linear", steps=2, batch_size=4, lr=1e-2)
            inject(model, config)
            recorder = Losses()
            grads.append([])
            train(model, data, config, callbacks=[recorder])
            losses.append(recorder.losses)
    finally:
        hook.remove()
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=0)
    assert len(grads[0]) == len(grads[1]) > 0
    for grouped, padded in zip(grads[1], grads[0], strict=True):
        assert (grouped - padded).norm() <= 1e-5 * padded.norm() + 1e-12


@pytest.mark.slow  # inductor compiles each layer shape once: minutes on a 2-core CPU
def test_compiled_layers_take_the_same_steps(llama: tuple[nn.Module, Any]) -> None:
    ex = Example(tuple(range(3, 40)), tuple(range(3, 40)))
    out = []
    for compiled in (False, True):
        model = copy.deepcopy(llama[0])
        config = TrainConfig(compile=compiled, targets="all-linear", steps=2, batch_size=1, lr=1e-2)
        inject(model, config)
        losses = Losses()
        train(model, [ex], config, callbacks=[losses])
        out.append(losses.losses)
    torch.testing.assert_close(torch.tensor(out[1]), torch.tensor(out[0]), rtol=1e-5, atol=0)


def test_tokens_per_second_is_the_mean_after_the_first_step_not_one_step_s_rate() -> None:
    from loractl.train.loop import Throughput

    rate = Throughput()
    assert rate.add(1000, 10.0) == 100.0  # the first step (its warm-up) alone, until there is a second
    durations = [0.15, 10.0, 0.15, 10.0]  # steps whose own rates swing 6,600 ↔ 100 tok/s
    shown = [rate.add(1000, d) for d in durations]
    assert shown[0] == pytest.approx(1000 / 0.15)
    assert shown[-1] == pytest.approx(4000 / sum(durations)) and max(shown[1:]) / min(shown[1:]) < 2


def test_logged_tokens_per_second_covers_every_step_since_the_first() -> None:
    rates: list[tuple[int, float, float]] = []

    class Record(Callback):
        def on_step(self, metrics: dict[str, Any]) -> bool | None:
            rates.append((metrics["tokens"], metrics["step_s"], metrics["tokens_per_s"]))
            return None

    model = ToyLM()
    inject(model, TrainConfig(targets=["proj"], rank=2))
    train(model, toy_data(), TrainConfig(targets=["proj"], rank=2, steps=4, batch_size=2), callbacks=[Record()])
    assert rates[0][2] == pytest.approx(rates[0][0] / rates[0][1])  # the first step alone
    tokens, seconds = rates[-1][0] - rates[0][0], sum(s for _, s, _ in rates[1:])
    assert rates[-1][2] == pytest.approx(tokens / seconds)  # then every step since the first, not the last one
