"""The frozen base: a transformers causal LM in the chosen dtype, optionally quantized, on the chosen device.

Memory is the point: a base held in float32 needs 4 bytes per parameter (28 GB for 7 B), in
bf16 2, and quantized by bitsandbytes to nf4/fp4 about 0.5 (int8: 1). The LoRA factors and
their optimizer state stay float32 whatever the base holds.
"""

from __future__ import annotations

import re
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..choices import BaseDtype, Quantize
from ..errors import InputNotFoundError, LoractlError, UsageError
from ..extras import require_extra
from ..io.checkpoint import Checkpoint
from .base_matmul import quant_state
from .quantize_rows import row_block_quantization

BASE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
HUB_PROBE_TIMEOUT = 10.0  # seconds the Hub has to answer for a base given by id


def load_base(
    base: str | Path,
    *,
    dtype: BaseDtype | None = None,
    quantize: Quantize | None = None,
    device: str = "cpu",
    command: str = "train",
    for_fsdp: bool = False,
) -> tuple[nn.Module, Any]:
    """A transformers causal LM and its tokenizer, from a directory or a Hub id, loaded straight onto `device`.

    `dtype` None keeps the checkpoint's own dtype. `quantize` replaces the linear layers (not the
    output head) by bitsandbytes `Linear4bit` (nf4, fp4) or `Linear8bitLt` (int8), computing in `dtype`;
    4-bit weights are quantized in row blocks as they arrive (`quantize_rows`: the same bytes).
    `for_fsdp` stores the packed 4-bit bytes in the compute dtype (QLoRA-FSDP: bitsandbytes'
    `quant_storage`), so that FSDP flattens and shards them with the layer's other parameters.
    `command` (train, eval) is named when a dependency is missing.
    """
    require_extra("train", purpose=command)
    base = _hub_base(base) if _check_base(base) else base
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        config = AutoConfig.from_pretrained(base)  # given, so that transformers does not deep-copy the options
        torch_dtype = BASE_DTYPES[dtype] if dtype else _own_dtype(config)
        options: dict[str, Any] = {"config": config, "dtype": torch_dtype, "device_map": {"": device}}
        if quantize is not None:
            options["quantization_config"] = quantization_config(quantize, torch_dtype, for_fsdp=for_fsdp)
        with warnings.catch_warnings(), ExitStack() as files:  # bitsandbytes' notes on casting inputs, once per layer
            warnings.simplefilter("ignore", UserWarning)
            if quantize in ("nf4", "fp4"):
                files.enter_context(row_block_quantization())
            state = _read_on_demand(base, files)  # transformers takes weights or a name, not both
            if state is None:
                model = AutoModelForCausalLM.from_pretrained(base, **options)
            else:
                model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
                model = model_class.from_pretrained(None, state_dict=state, **options)
                model.name_or_path = model.config.name_or_path = str(base)
                if (Path(base) / "generation_config.json").is_file():
                    model.generation_config = GenerationConfig.from_pretrained(base)
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, KeyError) as e:  # KeyError: a config no causal LM class takes
        raise LoractlError(
            f"cannot load base {base}: {str(e).splitlines()[0][:200]}",
            hint="a base is a transformers causal LM directory with its tokenizer",
        ) from None
    return model, tokenizer


def quantization_config(quantize: Quantize, compute_dtype: torch.dtype, *, for_fsdp: bool = False) -> Any:
    """transformers' `BitsAndBytesConfig` for `--quantize` (the output head stays unquantized); `for_fsdp`:
    4-bit bytes stored in the compute dtype (see `load_base`)."""
    require_extra("qlora", purpose="--quantize")
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    storage = compute_dtype if for_fsdp else torch.uint8
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage,
    )


def is_quantized(layer: nn.Module) -> bool:
    """Whether a linear layer's weight is bitsandbytes-packed (no longer the checkpoint's bytes), whatever
    dtype stores the packed bytes (`quant_storage`)."""
    weight = getattr(layer, "weight", None)
    return isinstance(weight, torch.Tensor) and (not weight.dtype.is_floating_point or quant_state(layer) is not None)


def _own_dtype(config: Any) -> torch.dtype:
    """The checkpoint's dtype as its config.json states it; float32 when it states none."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def _read_on_demand(base: str | Path, files: ExitStack) -> dict[str, Any] | None:
    """A local safetensors checkpoint's tensors as slices that `pread` each tensor when transformers converts it.

    transformers otherwise maps every shard (mmap) for the whole load, and every page it reads counts in
    the process's RSS until the end: loading a bf16 checkpoint cast to another dtype or quantized would
    peak at the file's size plus the result. Read tensor by tensor, only the result stays. None (transformers
    reads the files itself) for a Hub id or a directory without safetensors.
    """
    if not Path(base).is_dir():
        return None
    try:
        with Checkpoint(base) as checkpoint:
            shards = list(checkpoint.headers)
    except LoractlError:
        return None
    from safetensors import safe_open

    state: dict[str, Any] = {}
    for shard in shards:
        handle = files.enter_context(safe_open(str(shard), framework="pt", device="cpu", backend="pread"))
        state.update({name: handle.get_slice(name) for name in handle.keys()})  # noqa: SIM118 (not a dict)
    return state


def _hub_base(repo_id: str | Path) -> str | Path:
    """A Hub id as transformers should load it: the id when the Hub answers, else the HF cache's snapshot.

    One request with a timeout decides, so that an unreachable Hub (offline mode, no network) ends in
    one error within seconds, not after huggingface_hub's retries (11 warnings over half a minute).
    """
    from ..remote.errors import OfflineError, TransientError
    from ..remote.hf import HubRemote

    remote = HubRemote(str(repo_id))
    try:
        remote.probe(timeout=HUB_PROBE_TIMEOUT)
        return repo_id
    except (OfflineError, TransientError):
        cached = remote.cached()
    if cached is None:
        raise OfflineError(
            f"cannot reach the Hub for base {repo_id}, and the local cache does not hold it",
            hint="give a local model directory, or run once with the Hub reachable so that it is cached",
        )
    return cached


def _check_base(base: str | Path) -> bool:
    """Refuse a base that is neither a model directory nor a Hub id; True for a Hub id."""
    path = Path(base)
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(
            f"base directory {path} has no config.json",
            hint="point --base at a transformers model directory (config.json, safetensors, tokenizer)",
        )
    if not path.exists() and not _HUB_ID.fullmatch(str(base)):
        raise InputNotFoundError(f"base {base} does not exist", hint="give a model directory or a Hub id owner/name")
    return not path.exists()
