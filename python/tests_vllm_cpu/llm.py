"""One vLLM engine, driven as users drive it: ``vllm.LLM(...)`` then ``generate``.

    python llm.py SPEC_JSON

SPEC: {"ckpt", "load_format", "extra": {...}, "offload": {vLLM's offload keyword arguments},
"tp": N, "enforce_eager": bool, "max_tokens": N, "corrupt_publication": bool, "in_process":
bool, "hold": bool, "f_linear": [weight names]}. Prints one JSON line: for each prompt the greedy token ids and each sampled
token's logprob, and seconds from start to ready and to the first token. ``in_process`` runs the
engine core and its worker in this process (vLLM's "uni" executor), which also times
``load_model``, its weights and its post-processing; ``hold`` then waits for stdin to close, so
a benchmark can measure the process's memory. ``f_linear`` makes vLLM's own disk load run the
named weights' layers on its ``F.linear`` path (vLLM's ``_cpu_skip_gemm_dispatch``) instead of
oneDNN, as offloadd's offloader does for the layers it offloads. vLLM's logs, the plugin's included, go to
stdout and stderr.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("in_process") or spec.get("corrupt_publication") or spec.get("f_linear"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        spec["distributed_executor_backend"] = "uni"
    timings = time_load_model() if spec.get("in_process") else {}
    if spec.get("f_linear"):
        unpacked(spec["f_linear"])
    if spec.get("corrupt_publication"):
        # Simulates a publication that cannot serve: one weight's bytes never reach the pool.
        # Needs the engine core and its worker in this process, where the patch applies.
        from offloadd.client import Client

        send = Client.write_model

        def lossy(self, created, tensors):  # type: ignore[no-untyped-def]
            it = iter(tensors)
            fingerprint = next(it)
            next(it)  # the first weight's bytes are never sent
            return send(self, created, itertools.chain([fingerprint], it))

        Client.write_model = lossy  # type: ignore[method-assign]
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=spec["ckpt"], dtype="float32", seed=0, max_model_len=256, kv_cache_memory_bytes=1 << 30,
        enforce_eager=spec.get("enforce_eager", True), tensor_parallel_size=spec.get("tp", 1),
        load_format=spec.get("load_format", "auto"), model_loader_extra_config=spec.get("extra", {}),
        distributed_executor_backend=spec.get("distributed_executor_backend"), **spec.get("offload", {}),
    )
    ready = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16), logprobs=0)
    first = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    first_token = time.perf_counter()
    assert first[0].outputs[0].token_ids
    outputs = []
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        c = out.outputs[0]
        ids = list(c.token_ids)
        outputs.append({"prompt": out.prompt, "token_ids": ids, "text": c.text,
                        "logprobs": [step[t].logprob for step, t in zip(c.logprobs, ids, strict=True)]})
    print(json.dumps({"outputs": outputs, "ready_s": ready - started, "first_token_s": first_token - ready,
                      **timings, "pid": os.getpid()}), flush=True)
    if spec.get("hold"):
        sys.stdin.read()


def unpacked(weights: list[str]) -> None:
    """Marks the modules of these weights as offloadd's offloader marks offloaded ones, after
    DefaultModelLoader loads them and before vLLM post-processes them."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    load = DefaultModelLoader.load_weights

    def load_weights(self: DefaultModelLoader, model: object, model_config: object) -> None:
        load(self, model, model_config)
        for name in weights:
            model.get_submodule(name.rpartition(".")[0])._cpu_skip_gemm_dispatch = True  # type: ignore[attr-defined]

    DefaultModelLoader.load_weights = load_weights  # type: ignore[method-assign]


def time_load_model() -> dict[str, float]:
    """Wraps the CPU runner's load_model, the two loaders' weight steps and vLLM's
    post-processing with timers; the dict fills as they run."""
    from vllm.model_executor.model_loader import base_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from offloadd.vllm import loader

    seconds: dict[str, float] = {}

    def timed(owner: object, attr: str, key: str) -> None:
        inner = getattr(owner, attr)

        def wrapper(*args: object, **kwargs: object) -> object:
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t

        setattr(owner, attr, wrapper)

    timed(CPUModelRunner, "load_model", "load_model_s")
    timed(DefaultModelLoader, "load_weights", "weights_s")
    timed(loader._Binding, "load_weights", "weights_s")
    timed(base_loader, "process_weights_after_loading", "post_processing_s")
    return seconds


if __name__ == "__main__":
    main()
