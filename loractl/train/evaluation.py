"""`evaluate_adapters`: mean loss per label token and perplexity of a base alone and with each adapter.

The base is loaded once; each adapter is applied in turn with forward hooks that add
scale · B (A x) (+ scale · bias) to the adapted layers' outputs, PEFT's unmerged LoRA forward (an
embedding: scale · B A[:, ids]; DoRA: the output rescaled by m / ‖W + scale · B A‖ per row, as
PEFT's DoRA forward computes it), and removed again, so the base weights are never modified.
Full tensors (modules_to_save) are swapped in as parameters of their own, so a head tied to the
embeddings is untied for the adapter as PEFT's `ModulesToSaveWrapper` does, and restored. Every adapter is checked against the base before the first forward pass.
Data lines are those `train` reads (`data.load_dataset`): text, prompt/completion, chat messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import Adapter, LoraModule
from ..errors import AdapterError, IntegrityError, LoractlError, ShapeMismatchError, UsageError
from ..io.checkpoint import Checkpoint, other_base
from ..ops.merge_vocab import grows
from .base import load_base
from .base_matmul import is_conv1d
from .data import IGNORE, Example, collate, load_dataset, require_data_file
from .lora_layers import is_adaptable
from .loss import CausalLMLoss

Track = Callable[[Iterable[Any], int, str], Iterable[Any]]  # (items, total, description) → items
MAX_NEW_TOKENS = 32
_HINT = "the adapter was made for another base; compare 'loractl inspect ADAPTER' with the base's config.json"


@dataclass(frozen=True)
class EvalRow:
    """One model evaluated: the base (`adapter` None) or the base with one adapter."""

    name: str
    adapter: str | None
    loss: float  # mean cross-entropy per label token, nats
    perplexity: float
    completion: str | None = None


@dataclass(frozen=True)
class EvalReport:
    data: str
    data_sha256: str
    examples: int
    tokens: int  # label tokens scored per model
    rows: tuple[EvalRow, ...]
    prompt: str | None = None
    base_notes: tuple[str, ...] = ()  # adapters made for another base, evaluated anyway (allow_base_mismatch)

    def to_dict(self) -> dict[str, object]:
        base = self.rows[0].loss
        rows = [{**vars(r), "delta_loss": r.loss - base} for r in self.rows]
        return {"data": self.data, "data_sha256": self.data_sha256, "examples": self.examples,
                "tokens": self.tokens, "prompt": self.prompt, "base_notes": list(self.base_notes),
                "models": rows}  # fmt: skip


def evaluate_adapters(
    base: str | Path,
    adapters: Sequence[tuple[str, Adapter]],
    data: str | Path,
    *,
    max_len: int = 512,
    batch_size: int = 8,
    prompt: str | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    chat_template: bool = True,
    device: str = "cpu",
    track: Track | None = None,
    allow_base_mismatch: bool = False,
) -> EvalReport:
    """Score `data` under `base` and under `base` + each named adapter; optionally complete `prompt` greedily.

    An adapter that records another base's fingerprint is refused (`IntegrityError`) before the base
    loads, as merge refuses it; `allow_base_mismatch` evaluates it anyway and says so in `base_notes`.
    """
    require_data_file(data)
    notes = check_bases(base, adapters, allow_base_mismatch)
    model, tokenizer = load_base(base, command="eval")
    for label, candidate in adapters:
        check_fits(model, candidate, label)
    dataset = load_dataset(data, tokenizer, max_len)
    model.to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, tokens = [], sum(ex.num_targets for ex in dataset.examples)
    models: list[tuple[str, Adapter | None]] = [("base", None), *adapters]
    for name, adapter in models:
        with applied(model, adapter):
            batches = _batches(dataset.examples, batch_size)
            loss = mean_loss(model, (track or _untracked)(batches, len(batches), name), pad, device)
            completion = _complete(model, tokenizer, prompt, max_new_tokens, chat_template, device) if prompt else None
        rows.append(EvalRow(name, None if adapter is None else name, loss, _perplexity(loss), completion))
    return EvalReport(str(data), dataset.sha256, len(dataset), tokens, tuple(rows), prompt, notes)


def check_bases(base: str | Path, adapters: Sequence[tuple[str, Adapter]], allow_mismatch: bool) -> tuple[str, ...]:
    """Each adapter's recorded base fingerprint against a local safetensors `base` (merge's check).

    Notes for the mismatches `allow_mismatch` lets through. A Hub id, or a base without safetensors,
    has no files to fingerprint: it is not checked.
    """
    recorded = [(label, a, a.meta.base_fingerprint) for label, a in adapters if a.meta.base_fingerprint]
    if not recorded or not Path(base).is_dir():
        return ()
    try:
        ckpt = Checkpoint(base)
    except LoractlError:
        return ()
    notes = []
    with ckpt:
        for label, adapter, fingerprint in recorded:
            actual = other_base(ckpt, adapter.modules, fingerprint, adapter.meta.base_views)
            if actual is None:
                continue
            if not allow_mismatch:
                raise IntegrityError(
                    f"the adapter was made for another base (its base fingerprint {fingerprint[:19]}…, "
                    f"this base {actual[:19]}…)",
                    path=label,
                    hint="evaluate it on the base it was trained or extracted on "
                    "(--allow-base-mismatch evaluates anyway if you know they match)",
                )
            notes.append(f"{label}: made for another base (fingerprint {fingerprint[:19]}…), evaluated anyway")
    return tuple(notes)


def mean_loss(model: nn.Module, batches: Iterable[Sequence[Example]], pad_id: int, device: str = "cpu") -> float:
    """Σ cross-entropy over label tokens / their count (the same sum `train` minimises)."""
    loss_fn = CausalLMLoss(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for rows in batches:
            batch = collate(rows, pad_id)
            mask = batch["attention_mask"]
            total += float(loss_fn(batch["input_ids"].to(device), batch["labels"].to(device),
                                   None if bool(mask.all()) else mask.to(device)))  # fmt: skip
            count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return total / count if count else math.nan


def check_fits(model: nn.Module, adapter: Adapter, name: str) -> None:
    """Raise unless every module of `adapter` is a linear layer of `model` with matching shapes."""
    for path, m in adapter.modules.items():
        if m.kind not in ("linear", "embedding"):
            raise UsageError(f"{name}: module {path!r} is {m.kind} LoRA, which eval does not apply",
                             hint="eval applies LoRA and DoRA on linear layers and embeddings; merge and eval the merge")  # fmt: skip
        layer = _submodule(model, path, name)
        if m.kind == "embedding":
            _check_embedding(layer, m, path, name)
            continue
        if not is_adaptable(layer):
            raise ShapeMismatchError(f"{name}: {path!r} is a {type(layer).__name__} in the base, not a linear layer",
                                     hint=_HINT)  # fmt: skip
        out, inp = _layer_shape(layer)
        if (m.out_features, m.in_features) != (out, inp):
            raise ShapeMismatchError(
                f"{name}: module {path!r}: adapter ΔW is {m.out_features}×{m.in_features} but the base layer is "
                f"{out}×{inp}",
                hint=_HINT,
            )
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied head's weight under its own name too
    for key, t in adapter.full_tensors.items():
        if key in params and len(t.shape) == 2 and grows(tuple(t.shape), tuple(params[key].shape)):
            raise UsageError(f"{name}: full tensor {key!r} has {t.shape[0]} rows where the base has "
                             f"{params[key].shape[0]}: the adapter adds tokens, which eval does not score",
                             hint="merge the adapter (it grows the vocabulary) and eval the merge as the base")  # fmt: skip
        if key not in params or params[key].shape != t.shape:
            raise ShapeMismatchError(f"{name}: full tensor {key!r} {list(t.shape)} has no counterpart in the base",
                                     hint=_HINT)  # fmt: skip


def _check_embedding(layer: nn.Module, m: LoraModule, path: str, name: str) -> None:
    if not isinstance(layer, nn.Embedding):
        raise ShapeMismatchError(f"{name}: {path!r} is a {type(layer).__name__} in the base, not an embedding",
                                 hint=_HINT)  # fmt: skip
    if (m.in_features, m.out_features) != (layer.num_embeddings, layer.embedding_dim):
        raise ShapeMismatchError(
            f"{name}: embedding LoRA {path!r} is {m.in_features}×{m.out_features} but the base embedding is "
            f"{layer.num_embeddings}×{layer.embedding_dim}",
            hint=_HINT,
        )


@contextmanager
def applied(model: nn.Module, adapter: Adapter | None) -> Iterator[nn.Module]:
    """`model` computing as base + `adapter` inside the block (nothing changes for None); restored on exit."""
    handles, saved = [], {}
    try:
        if adapter is not None:
            for path, m in adapter.modules.items():
                layer = model.get_submodule(path)
                handles.append(layer.register_forward_hook(_hook(layer, m)))
            for key, t in adapter.full_tensors.items():
                owner, _, leaf = key.rpartition(".")
                params = model.get_submodule(owner)._parameters
                original = params[leaf]
                assert original is not None
                saved[key] = (params, leaf, original)
                params[leaf] = nn.Parameter(t.to(original.device, original.dtype), requires_grad=False)
        yield model
    finally:
        for h in handles:
            h.remove()
        for params, leaf, original in saved.values():
            params[leaf] = original


def _hook(layer: nn.Module, m: LoraModule) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    if m.kind == "embedding":
        return _embedding_hook(m, weight.device)
    if m.magnitude is not None:
        return _dora_hook(layer, m, weight)
    return _lora_hook(m, weight.device)


def _lora_hook(m: LoraModule, device: torch.device) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    a, b = m.A.to(device, torch.float32), m.B.to(device, torch.float32)
    bias = None if m.bias is None else m.bias.to(device, torch.float32)

    def hook(_layer: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(inputs[0].to(torch.float32), a), b, bias) * m.scale
        return output + delta.to(output.dtype)

    return hook


def _embedding_hook(m: LoraModule, device: torch.device) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    """PEFT's embedding LoRA: out + scale · (Aᵀ[ids]) Bᵀ."""
    a_t, b = m.A.to(device, torch.float32).t(), m.B.to(device, torch.float32)

    def hook(_layer: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.embedding(inputs[0], a_t), b) * m.scale
        return output + delta.to(output.dtype)

    return hook


def _dora_hook(
    layer: nn.Module, m: LoraModule, weight: torch.Tensor
) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    """PEFT's DoRA forward: b + m/‖W + s·B A‖ ⊙ (W x + s·B A x), from the base output W x + b."""
    device = weight.device
    a, b = m.A.to(device, torch.float32), m.B.to(device, torch.float32)
    w = weight.detach().to(torch.float32)
    w = w.t() if is_conv1d(layer) else w
    assert m.magnitude is not None
    g = m.magnitude.to(device, torch.float32) / torch.linalg.vector_norm(torch.addmm(w, b, a, alpha=m.scale), dim=1)
    bias = getattr(layer, "bias", None)
    base_bias = torch.zeros((), device=device) if bias is None else bias.detach().to(torch.float32)

    def hook(_layer: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        lora = F.linear(F.linear(inputs[0].to(torch.float32), a), b) * m.scale
        out: torch.Tensor = g * (output.to(torch.float32) - base_bias + lora) + base_bias
        return out.to(output.dtype)

    return hook


def _complete(model: nn.Module, tokenizer: Any, prompt: str, max_new: int, template: bool, device: str) -> str:
    """Greedy completion of `prompt` (as one user turn through the chat template, when there is one)."""
    if template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        ids = tokenizer.encode(str(text), add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    inputs = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new,  # type: ignore[operator]
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


def _submodule(model: nn.Module, path: str, name: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ShapeMismatchError(f"{name}: module {path!r} is not in the base", hint=_HINT) from None


def _layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer; a GPT-2 Conv1D stores its weight (in, out)."""
    weight = layer.weight
    if not isinstance(weight, torch.Tensor):
        raise AdapterError(f"layer {type(layer).__name__} has no weight tensor")
    inp, out = weight.shape if is_conv1d(layer) else weight.shape[::-1]
    return int(out), int(inp)


def _batches(examples: Sequence[Example], size: int) -> list[Sequence[Example]]:
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def _untracked(items: Iterable[Any], _total: int, _description: str) -> Iterable[Any]:
    return items


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
