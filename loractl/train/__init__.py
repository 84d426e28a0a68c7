"""loractl's own LoRA training: inject `LoraLinear` layers, train them, extract a canonical adapter.

from loractl.train import TrainConfig, inject, train, adapter_from_model
config = TrainConfig(rank=8, targets="all-linear", steps=200)
inject(model, config)                # any torch.nn.Module with nn.Linear / Conv1D layers
train(model, examples, config)       # examples: loractl.train.data.Example rows
adapter = adapter_from_model(model)  # → loractl.save_adapter(adapter, "out")
"""

from .callbacks import Callback
from .config import TrainConfig
from .data import Example, load_dataset
from .export import adapter_from_model
from .inject import Injection, inject
from .job import TrainSummary, train_adapter
from .loop import TrainResult, evaluate, train
from .lora_layers import LoraLinear

__all__ = [
    "Callback",
    "Example",
    "Injection",
    "LoraLinear",
    "TrainConfig",
    "TrainResult",
    "TrainSummary",
    "adapter_from_model",
    "evaluate",
    "inject",
    "load_dataset",
    "train",
    "train_adapter",
]
