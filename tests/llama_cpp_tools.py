"""llama.cpp's own Python converters, from the llama-cpp-python sdist, cached once per machine.

The llama-cpp-python wheel has no `vendor/llama.cpp`; its sdist (same version as the installed
wheel) does: `convert_hf_to_gguf.py` (base model → GGUF), `convert_lora_to_gguf.py` (PEFT
adapter → GGUF LoRA), their `conversion` package and the matching `gguf-py`. `pip download`
fetches the sdist (PyPI is reachable in CI; nothing else is), and only those files are kept,
under `$LORACTL_TEST_CACHE/llama.cpp-<version>`, made in a temporary sibling, renamed, under a lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from real_model import CACHE

_KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def converters_dir() -> Path:
    """The directory holding llama.cpp's converters for the installed llama-cpp-python."""
    dest = CACHE / f"llama.cpp-{llama_cpp_version()}"
    if (dest / "convert_lora_to_gguf.py").is_file():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".llama-cpp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "convert_lora_to_gguf.py").is_file():
            _fetch(dest)
    return dest


def _fetch(dest: Path) -> None:
    version = llama_cpp_version()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
             "--no-binary", ":all:", "-q", "-d", tmp],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("*.tar.gz")
        staging = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and member.isfile() and rel.startswith(_KEEP):
                    member.name = rel
                    tar.extract(member, staging, filter="data")
        staging.rename(dest)


def run_converter(script: str, *runs: list[str | Path]) -> None:
    """Run one of llama.cpp's converters once per argument list, in one interpreter (torch imports once),
    with its own gguf-py first on the path."""
    tools = converters_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools / "gguf-py"), str(tools)])}
    driver = (
        "import json, runpy, sys\n"
        "script, runs = sys.argv[1], json.loads(sys.argv[2])\n"
        "for argv in runs:\n"
        "    sys.argv = [script, *argv]\n"
        "    runpy.run_path(script, run_name='__main__')\n"
    )
    argvs = json.dumps([[str(a) for a in run] for run in runs])
    done = subprocess.run(
        [sys.executable, "-c", driver, str(tools / script), argvs], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise AssertionError(f"{script} failed:\n{done.stderr[-3000:]}")


def base_gguf(model_dir: Path) -> Path:
    """An F32 GGUF of `model_dir` made by `convert_hf_to_gguf.py`, cached beside the model."""
    out = CACHE / f"{model_dir.name}-f32-llama.cpp-{llama_cpp_version()}.gguf"
    if out.is_file():
        return out
    with open(CACHE / ".llama-cpp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_file():
            tmp = out.with_name(out.name + ".tmp")
            run_converter("convert_hf_to_gguf.py", [model_dir, "--outtype", "f32", "--outfile", tmp])
            tmp.rename(out)
    return out


def lora_ggufs(*jobs: tuple[Path, Path, Path]) -> None:
    """What `convert_lora_to_gguf.py` writes (F32) for each (PEFT adapter, base model, output) job."""
    run_converter(
        "convert_lora_to_gguf.py",
        *([adapter, "--base", model, "--outtype", "f32", "--outfile", out] for adapter, model, out in jobs),
    )
