"""`evaluate_adapters`: mean loss per label token and perplexity of a base alone and with each adapter.

The base is loaded once; each adapter is applied in turn with forward hooks that add
scale · B (A x) (+ scale · bias) to the adapted layers' outputs, PEFT's unmerged LoRA forward (an
embedding: scale · B A[:, ids]; DoRA: the output rescaled by m / ‖W + scale · B A‖ per row, as
PEFT's DoRA forward computes it), and removed again, so the base weights are never modified.
Full tensors (modules_to_save) are swapped in as parameters of their own, so a head tied to the
embeddings is untied for the adapter as PEFT's `ModulesToSaveWrapper` does, and restored. Every adapter is checked against the base before the first forward pass.
An adapter that adds tokens (its embeddings and head saved whole with more rows, PEFT's
`save_embedding_layers`) is applied as a PEFT user loads it: the base resized to its rows (a tied
head follows the embeddings), the saved rows in, and the data tokenized by the tokenizer saved
beside it, the one `merge` gives the merged model.
Data lines are those `train` reads (`data.load_dataset`): text, prompt/completion, chat messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from ..ops.merge_vocab import grows, tokenizer_files, vocab_findings
from .base import load_base
from .base_matmul import is_conv1d
from .data import IGNORE, Example, by_length, collate, load_dataset, require_data_file
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
    tokens: int = 0  # label tokens scored
    own_tokenizer: bool = False  # the data tokenized by the adapter's own tokenizer (it adds tokens), not the base's


@dataclass(frozen=True)
class EvalReport:
    data: str
    data_sha256: str
    examples: int
    tokens: int  # label tokens scored per model (under the base's tokenizer; a row's own `tokens` may differ)
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
    adapter_dirs: Mapping[str, str | Path] | None = None,
) -> EvalReport:
    """Score `data` under `base` and under `base` + each named adapter; optionally complete `prompt` greedily.

    An adapter that records another base's fingerprint is refused (`IntegrityError`) before the base
    loads, as merge refuses it; `allow_base_mismatch` evaluates it anyway and says so in `base_notes`.
    `adapter_dirs` maps a name to the adapter's directory, where an adapter that adds tokens keeps
    the tokenizer that knows them (default: each name that is a directory); without one, the base's.
    """
    require_data_file(data)
    notes = check_bases(base, adapters, allow_base_mismatch)
    model, tokenizer = load_base(base, command="eval")
    for label, candidate in adapters:
        check_fits(model, candidate, label)
    if adapter_dirs is None:
        adapter_dirs = {label: Path(label) for label, _ in adapters if Path(label).is_dir()}
    own = {label: _own_tokenizer(model, a, label, adapter_dirs.get(label)) for label, a in adapters}
    dataset = load_dataset(data, tokenizer, max_len)
    model.to(device).eval()
    rows = []
    models: list[tuple[str, Adapter | None]] = [("base", None), *adapters]
    for name, adapter in models:
        words = own.get(name) if adapter is not None else None
        examples = dataset.examples if words is None else load_dataset(data, words, max_len).examples
        words = words or tokenizer
        pad = words.pad_token_id if words.pad_token_id is not None else 0
        with applied(model, adapter):
            batches = _batches(examples, batch_size)
            loss = mean_loss(model, (track or _untracked)(batches, len(batches), name), pad, device)
            completion = _complete(model, words, prompt, max_new_tokens, chat_template, device) if prompt else None
        tokens, shown = sum(ex.num_targets for ex in examples), None if adapter is None else name
        rows.append(EvalRow(name, shown, loss, _perplexity(loss), completion, tokens, words is not tokenizer))
    return EvalReport(str(data), dataset.sha256, len(dataset), rows[0].tokens, tuple(rows), prompt, notes)


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
    resized = {key: tuple(t.shape) for key, t in _grown(model, adapter).items()}
    once = {n: tuple(p.shape) for n, p in model.named_parameters()}  # a tied head's weight once: it follows
    for finding in vocab_findings(resized, once, None):
        raise ShapeMismatchError(f"{name}: {finding.message}", hint="save the embeddings and the head whole "
                                 "with an adapter that adds tokens, both resized (PEFT's save_embedding_layers)")  # fmt: skip
    for key, t in adapter.full_tensors.items():
        if key in resized:
            continue
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


def _grown(model: nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's full tensors that are base tensors with rows added: the vocabulary it grows."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {key: t for key, t in adapter.full_tensors.items()
            if key in params and grows(tuple(t.shape), tuple(params[key].shape))}  # fmt: skip


def _own_tokenizer(model: nn.Module, adapter: Adapter, name: str, directory: str | Path | None) -> Any:
    """The tokenizer saved beside an adapter that adds tokens (the one `merge` gives the merged model), or None."""
    grown = _grown(model, adapter)
    if not grown or directory is None or not tokenizer_files(Path(directory)):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise UsageError(f"{name}: cannot load the tokenizer saved beside the adapter: {str(e).splitlines()[0][:200]}",
                         hint="save the tokenizer that knows the new tokens beside the adapter "
                         "(tokenizer.save_pretrained)") from None  # fmt: skip
    rows = min(t.shape[0] for t in grown.values())
    if len(tokenizer) > rows:
        raise ShapeMismatchError(f"{name}: the tokenizer beside the adapter has {len(tokenizer)} tokens, its "
                                 f"embeddings {rows} rows", hint="save the tokenizer the adapter was trained with")  # fmt: skip
    return tokenizer


@contextmanager
def applied(model: nn.Module, adapter: Adapter | None) -> Iterator[nn.Module]:
    """`model` computing as base + `adapter` inside the block (nothing changes for None); restored on exit.

    A tensor that grows the vocabulary replaces the base's everywhere it is used (a tied head
    follows its embeddings, as after `resize_token_embeddings`); config.json's vocab_size follows.
    """
    handles, saved = [], []
    config: Any = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    try:
        if adapter is not None:
            for path, m in adapter.modules.items():
                layer = model.get_submodule(path)
                handles.append(layer.register_forward_hook(_hook(layer, m)))
            grown = _grown(model, adapter)
            places = {key: _holders(model, key, adapter.full_tensors, key in grown) for key in adapter.full_tensors}
            for key, t in adapter.full_tensors.items():
                own, leaf = places[key][0]
                original = own[leaf]
                swapped = nn.Parameter(t.to(original.device, original.dtype), requires_grad=False)
                for where, name in places[key]:
                    saved.append((where, name, where[name]))
                    where[name] = swapped
            if grown and vocab is not None:
                config.vocab_size = next(iter(grown.values())).shape[0]
        yield model
    finally:
        for h in handles:
            h.remove()
        for params, leaf, original in reversed(saved):
            params[leaf] = original
        if vocab is not None:
            config.vocab_size = vocab


def _holders(model: nn.Module, key: str, replaced: Iterable[str], tied: bool) -> list[tuple[dict[str, Any], str]]:
    """(module parameters, name) where the tensor `key` goes: its own place, and with `tied` every other place the
    base uses the same tensor (a head tied to the embeddings) unless `replaced` names it too."""
    owner, _, leaf = key.rpartition(".")
    own = model.get_submodule(owner)._parameters
    param, others = own[leaf], set(replaced)
    places = [(own, leaf)]
    for path, module in model.named_modules(remove_duplicate=False) if tied else ():
        places += [(module._parameters, n) for n, p in module._parameters.items()
                   if p is param and f"{path}.{n}" not in others]  # fmt: skip
    return places


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
    """Batches of rows of similar length (longest first), so little padding is computed: the loss is a sum."""
    ordered = by_length(examples)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _untracked(items: Iterable[Any], _total: int, _description: str) -> Iterable[Any]:
    return items


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
