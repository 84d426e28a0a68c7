"""vLLM's engine behind a pipe: run by the vLLM venv's Python (tests/vllm_tools.py), never imported by the tests.

argv: MODEL MAX_LORA_RANK. One JSON request a line on stdin, one JSON answer a line on stdout:
  {"ids": [...], "adapter": PATH or null}  →  {"logprobs": [logprob of ids[i] given ids[:i], i ≥ 1]}
  {"check": PATH}                          →  {"refused": null or why}: the checks the engine runs first on
                                               an adapter (`PEFTHelper.validate_legal`), without the engine
  {"lora_config": {...}}                   →  {"refused": null or why}: vLLM's `LoRAConfig(**...)`
A request the engine fails answers {"error": "Type: message"}; the parent then starts a fresh engine.
vLLM's own logging goes to stderr; the line {"ready": SECONDS} on stdout says the engine is up.
"""

import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no workers to leak
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a quarter of the memory

MODEL, MAX_LORA_RANK = sys.argv[1], int(sys.argv[2])


ANSWERS = os.fdopen(os.dup(1), "w")  # the answers' own pipe; whatever else writes to stdout goes to stderr
os.dup2(2, 1)
sys.stdout = sys.stderr


def answer(doc: dict) -> None:
    ANSWERS.write(json.dumps(doc) + "\n")
    ANSWERS.flush()


def refusal(check, *args, **kwargs) -> str | None:
    """Why `check(*args, **kwargs)` raised ValueError (pydantic's ValidationError is one too), or None."""
    try:
        check(*args, **kwargs)
    except ValueError as e:
        return f"{type(e).__name__}: {e}"
    return None


def main() -> None:
    started = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.request import LoRARequest

    llm = LLM(model=MODEL, enable_lora=True, max_lora_rank=MAX_LORA_RANK, dtype="float32", enforce_eager=True,
              max_model_len=256, seed=0)  # fmt: skip
    answer({"ready": time.perf_counter() - started})
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    lora_ids: dict[str, int] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if "check" in request:
                helper = PEFTHelper.from_local_dir(request["check"], max_position_embeddings=None)
                answer({"refused": refusal(helper.validate_legal, llm.llm_engine.vllm_config.lora_config)})
            elif "lora_config" in request:
                answer({"refused": refusal(LoRAConfig, **request["lora_config"])})
            else:
                adapter = request["adapter"]
                lora = None
                if adapter is not None:
                    lora_id = lora_ids.setdefault(adapter, len(lora_ids) + 1)
                    lora = LoRARequest(f"adapter{lora_id}", lora_id, adapter)
                ids = request["ids"]
                (out,) = llm.generate({"prompt_token_ids": ids}, params, lora_request=lora, use_tqdm=False)
                answer(
                    {"logprobs": [step[t].logprob for t, step in zip(ids[1:], out.prompt_logprobs[1:], strict=True)]}
                )
        except Exception as e:  # every failure goes back to the test, which judges it
            traceback.print_exc()
            answer({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
