"""The vLLM side of merg's vLLM backend, run as a script by vLLM's own python (`merg models install-vllm`):

    <vllm venv>/bin/python evaluation/vllm_worker.py     # started by evaluation.vllm_backend, never by hand

It imports nothing of merg (vLLM pins its own torch; merg's stack is not installed there). Protocol on
stdin/stdout: length-prefixed pickles (both ends are the same user's processes on one machine).
1. merg sends the engine settings: {"model", "max_model_len", "enforce_eager", "prompt_embeds",
   "kv_cache_gib", "threads"}; the worker starts the engine and answers {"seconds"}.
2. Then requests, each answered in order, or with {"error": "..."}:
   - {"op": "generate", "prompts": [token ids | (length, hidden) float32 array], "max_tokens",
     "temperature", "top_p", "seeds": [per prompt or None], "stop": [token ids]} -> {"tokens": [new ids per prompt]};
   - {"op": "score", "sequences": [token ids], "starts": [first scored position]} -> {"nll": [summed
     -log p of each sequence's tokens from its start], "counts": [how many]}; the sequences' blocks stay
     in the prefix cache, so generating from a prefix of one afterwards does not compute it again.
   An empty message ends it.
vLLM's own output goes to stderr: stdout carries only the protocol.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import time
import traceback


def read(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size)) if size else None


def write(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def start_engine(settings: dict):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.get("kv_cache_gib", 2)))
    if settings.get("threads"):
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the cores Ray gave the cell
        os.environ.setdefault("OMP_NUM_THREADS", str(settings["threads"]))
    from vllm import LLM

    return LLM(
        model=settings["model"], dtype="float32", max_model_len=settings["max_model_len"], seed=0,
        enforce_eager=settings["enforce_eager"], enable_prompt_embeds=settings["prompt_embeds"],
        enable_prefix_caching=True, disable_log_stats=True,
    )  # fmt: skip


def generate(llm, request: dict) -> list[list[int]]:
    import torch
    from vllm import SamplingParams
    from vllm.inputs import EmbedsPrompt, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(p)) if isinstance(p, list) else EmbedsPrompt(prompt_embeds=torch.from_numpy(p))
               for p in request["prompts"]]  # fmt: skip
    params = [
        SamplingParams(max_tokens=request["max_tokens"], temperature=request["temperature"], top_p=request["top_p"], seed=seed,
                       stop_token_ids=request["stop"], detokenize=False)
        for seed in request["seeds"]
    ]  # fmt: skip
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def score(llm, request: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    sequences = [list(s) for s in request["sequences"]]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
    nll, counts = [], []
    for output, sequence, start in zip(outputs, sequences, request["starts"]):
        rows = output.prompt_logprobs or []  # row t: log p(token t | tokens before it); row 0 is None
        nll.append(-sum(rows[t][sequence[t]].logprob for t in range(max(1, start), len(sequence))))
        counts.append(len(sequence) - max(1, start))
    return {"nll": nll, "counts": counts}


def main() -> None:
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever vLLM prints goes to stderr
    requests = sys.stdin.buffer
    settings = read(requests)
    started = time.perf_counter()
    try:
        llm = start_engine(settings)
    except Exception:
        write(channel, {"error": traceback.format_exc()})
        return
    write(channel, {"seconds": time.perf_counter() - started})
    while (request := read(requests)) is not None:
        try:
            if request["op"] == "score":
                write(channel, score(llm, request))
            else:
                write(channel, {"tokens": generate(llm, request)})
        except Exception:
            write(channel, {"error": traceback.format_exc()})


if __name__ == "__main__":
    main()
