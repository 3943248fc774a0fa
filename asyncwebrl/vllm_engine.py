"""The vLLM rollout engine (GPU; `pip install -e .[gpu]`), written against vLLM 0.33.0, the release pinned in
pyproject.toml (tests/test_vllm_api.py checks every name used here against it).

One `AsyncLLM` with vLLM's own data parallelism: `replicas` engine processes, one per rollout GPU, tensor parallel 1
(an 8B model fits on one GPU, and Qwen3-VL-8B's 32 query / 8 key-value heads would not split over 6 GPUs). vLLM
balances the requests over the replicas. Each episode step sends its own request (`asample`), so the engines batch
continuously: no reply waits for another episode's longest, and there is no batch barrier.

New weights arrive as files (asyncwebrl/weights.py). `load_weights` pauses generation (requests in flight are kept;
their KV cache is dropped and recomputed on the new weights when generation resumes), has every replica stream the
folder into its model (asyncwebrl/vllm_worker.py), collects one digest per replica for the loop's refresh check,
and resumes. A reply that straddles a refresh is stamped with the version it started on, the oldest of its tokens,
which the staleness bound treats conservatively; its behaviour log-probs are exact per token either way.

The engine lives in the rollout thread's event loop (`start` is awaited there); the trainer thread's refresh runs
on that loop too, with a timeout, so a dead engine stops the run loudly instead of hanging it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import subprocess
from dataclasses import dataclass

import torch

from asyncwebrl import load

policy_mod = load("02_policy")


@dataclass
class EngineConfig:
    replicas: int = 1  # engine processes, one per rollout GPU of every node (data parallel, tensor parallel 1)
    replicas_local: int = 1  # of them, on this node; the others run headless on their own nodes (start_headless)
    address: str = "127.0.0.1"  # several nodes: the head node's address, where the replicas meet
    rpc_port: int = 29501  # several nodes: the head's port for the replicas' coordination
    max_model_len: int = 16384  # prompt + reply tokens; Qwen3-VL's own 256K would reserve ~36 GiB of KV cache
    gpu_memory_utilization: float = 0.85  # of each rollout GPU, for the weights and the KV cache
    enforce_eager: bool = False  # True: no CUDA graphs (starts faster, decodes slower)
    seed: int = 0  # vLLM's sampling seed
    refresh_timeout_s: float = 600.0  # a weight load that takes longer means a dead or stuck engine

    @classmethod
    def of_run(cls, cfg, place) -> "EngineConfig":
        """05's TrainConfig and Placement: a replica per rollout GPU of every node, meeting at torchrun's head."""
        return cls(replicas=max(1, place.replicas), replicas_local=max(1, place.rollout),
                   address=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                   rpc_port=int(os.environ.get("MASTER_PORT", "29500")) + 1, seed=cfg.seed,
                   max_model_len=cfg.max_model_len, gpu_memory_utilization=cfg.gpu_memory_utilization,
                   enforce_eager=cfg.enforce_eager)


def engine_args(cfg, engine: EngineConfig) -> dict:
    """AsyncEngineArgs of the rollout engine (a dict, so that it can be printed and tested without vLLM)."""
    args = dict(model=cfg.model, data_parallel_size=engine.replicas, tensor_parallel_size=1,
                worker_extension_cls="asyncwebrl.vllm_worker.WeightLoader",
                logprobs_mode="processed_logprobs",  # log-probs of the distribution sampled (after temperature)
                limit_mm_per_prompt={"image": cfg.images, "video": 0},  # no video: vLLM would profile its encoder
                max_model_len=engine.max_model_len, gpu_memory_utilization=engine.gpu_memory_utilization,
                enforce_eager=engine.enforce_eager, seed=engine.seed)
    if engine.replicas_local < engine.replicas:  # several nodes: vLLM's multi-node data parallelism
        args.update(data_parallel_size_local=engine.replicas_local, data_parallel_address=engine.address,
                    data_parallel_rpc_port=engine.rpc_port)
    return args


def headless_command(cfg, engine: EngineConfig, node: int) -> list[str]:
    """`vllm serve --headless` for node `node`'s replicas: they join the head's engine (vLLM's documented
    multi-node data parallel deployment) and serve its requests; no API server of their own."""
    a = engine_args(cfg, engine)
    return ["vllm", "serve", cfg.model, "--headless", "--data-parallel-size", str(engine.replicas),
            "--data-parallel-size-local", str(engine.replicas_local),
            "--data-parallel-start-rank", str(node * engine.replicas_local),
            "--data-parallel-address", engine.address, "--data-parallel-rpc-port", str(engine.rpc_port),
            "--worker-extension-cls", a["worker_extension_cls"], "--logprobs-mode", a["logprobs_mode"],
            "--limit-mm-per-prompt", json.dumps(a["limit_mm_per_prompt"]), "--max-model-len", str(a["max_model_len"]),
            "--gpu-memory-utilization", str(a["gpu_memory_utilization"]), "--seed", str(a["seed"]),
            *(["--enforce-eager"] if a["enforce_eager"] else [])]


def start_headless(cfg, engine: EngineConfig, node: int) -> subprocess.Popen:
    """Start this node's replicas (its first `replicas_local` GPUs); the caller terminates them at the end."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, range(engine.replicas_local))))
    return subprocess.Popen(headless_command(cfg, engine, node), env=env)


class VLLMSampler(policy_mod._Prompter):
    weights_dtype = torch.bfloat16  # what the trainer writes for the engine

    def __init__(self, cfg, engine: EngineConfig | None = None, version: int = 0):
        from transformers import AutoTokenizer
        try:
            from vllm import SamplingParams
        except ImportError as e:
            raise ImportError("the vLLM engine needs `pip install -e .[gpu]` on a CUDA machine") from e

        if policy_mod.constrained(cfg):
            raise ValueError("constrained decoding is implemented for the transformers sampler only "
                             "(it needs the exact budget-aware mask that Policy.logprobs replays)")
        self.cfg, self.engine, self.version = cfg, engine or EngineConfig(), version
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        # explicit, so that the model's generation_config (Qwen's top_k 20, top_p 0.8) cannot change the sampling
        self.params = SamplingParams(temperature=cfg.temperature, top_k=-1, top_p=1.0, logprobs=0,
                                     max_tokens=cfg.max_new_tokens)
        self.llm, self.loop, self.ids = None, None, itertools.count()

    async def start(self) -> None:
        """Start the engines in the running (rollout) event loop; minutes for an 8B model."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.loop = asyncio.get_running_loop()
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(self.cfg, self.engine)))

    async def asample(self, turn, store) -> policy_mod.Sample:
        images = policy_mod.screenshots(store, turn.images)
        prompt = {"prompt": turn.prompt, **({"multi_modal_data": {"image": images}} if images else {})}
        version, out = self.version, None
        async for out in self.llm.generate(prompt, self.params, request_id=f"r{next(self.ids)}"):
            pass
        c = out.outputs[0]
        lp = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)]
        return policy_mod.Sample(c.text, list(c.token_ids), lp, version, truncated=c.finish_reason == "length")

    async def _reload(self, folder: str) -> list[str]:
        await self.llm.pause_generation(mode="keep", clear_cache=True)
        try:
            per_replica = await self.llm.engine_core.call_utility_all_async(
                "collective_rpc", "load_weights_file", None, (folder,), None)
        finally:
            await self.llm.resume_generation()
        return [digest for workers in per_replica for digest in workers]

    def load_weights(self, folder: str, version: int) -> list[str]:
        """Called from the trainer thread; runs on the engine's event loop."""
        future = asyncio.run_coroutine_threadsafe(self._reload(folder), self.loop)
        try:
            digests = future.result(timeout=self.engine.refresh_timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RuntimeError(f"vLLM did not load the weights of version {version} within "
                               f"{self.engine.refresh_timeout_s:g} s (a dead or stuck engine)")
        self.version = version  # only after every replica holds them: a request started now gets them
        return digests

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
