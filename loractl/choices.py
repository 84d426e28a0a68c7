"""The closed vocabularies of command options, each written once: a `Literal` for the typed API, and the
tuple of its words (`typing.get_args`) that the ops check and the CLI offers as `click.Choice`.

Torch-free and import-free, so that `loractl --help` can build every command's choices from here.
"""

from __future__ import annotations

from typing import Literal, get_args

Device = Literal["auto", "cpu", "cuda", "mps"]  # `cuda:N` is accepted where the arithmetic runs (`ops.devices`)
Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]
Init = Literal["kaiming", "gaussian", "pissa", "olora"]  # and pissa_niter_N (`train.lora_init`)
BaseDtype = Literal["bf16", "fp16", "fp32"]
Quantize = Literal["nf4", "fp4", "int8"]
CombineMethod = Literal["cat", "svd", "linear", "ties", "dare", "dare_ties"]
MajoritySign = Literal["total", "frequency"]

DEVICES: tuple[str, ...] = get_args(Device)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
PRECISIONS: tuple[str, ...] = get_args(Precision)
INITS: tuple[str, ...] = get_args(Init)
BASE_DTYPES: tuple[str, ...] = get_args(BaseDtype)
QUANTIZE: tuple[str, ...] = get_args(Quantize)
COMBINE_METHODS: tuple[str, ...] = get_args(CombineMethod)
MAJORITY_SIGNS: tuple[str, ...] = get_args(MajoritySign)
