"""Policy benchmark (`python -m experiments.policy_bench`): the tiny model's costs on this CPU, medians of repeats.

One batch of 8 real MiniWoB++ steps (prompt + screenshot): Policy.logprobs forward (no grad), forward + backward
(what a train step costs per 8 steps), and HFSampler.sample (a whole reply of up to max_new_tokens, constrained),
with per-token time. Writes figures/policy_bench.json.
"""
from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from asyncwebrl import load


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_benchmark(out: Path, repeats: int = 5, task: str = "click-checkboxes") -> dict:
    pol = load("02_policy")
    cfg = pol.PolicyConfig()
    obs, store = asyncio.run(pol._observe(task, 0))
    policy, sampler = pol.Policy(cfg), pol.HFSampler(cfg)
    turns = [policy.turn(obs, pol.AgentState())] * 8
    torch.manual_seed(0)
    replies = [s.token_ids for s in sampler.sample(turns, store)]

    def forward():
        with torch.no_grad():
            policy.logprobs(turns, replies, store)

    def forward_backward():
        logp, mask = policy.logprobs(turns, replies, store)
        (-logp[mask].mean()).backward()
        policy.model.zero_grad(set_to_none=True)

    tokens = []

    def sample():
        tokens.append(sum(len(s.token_ids) for s in sampler.sample(turns, store)) / len(turns))

    result = dict(
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        params_M=round(sum(p.numel() for p in policy.model.parameters()) / 1e6, 2),
        prompt_tokens=int(pol.encode(policy.tokenizer, policy.image_processor, [turns[0].prompt],
                                     [pol.screenshots(store, turns[0].images)])["input_ids"].shape[1]),
        batch=len(turns), reply_tokens_mean=None,
        forward_s=round(_median_s(forward, repeats), 3),
        forward_backward_s=round(_median_s(forward_backward, repeats), 3),
        sample_s=round(_median_s(sample, repeats), 3))
    result["reply_tokens_mean"] = round(statistics.mean(tokens), 1)
    result["sample_ms_per_token"] = round(1000 * result["sample_s"] / result["reply_tokens_mean"], 1)
    print(json.dumps(result, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Policy benchmark: the tiny model's forward, forward+backward and "
                                            "sampling on a batch of 8 real MiniWoB++ steps (medians of repeats).")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "figures" / "policy_bench.json",
                   help="where the JSON result goes (default: figures/policy_bench.json)")
    run_benchmark(p.parse_args(argv).out)


if __name__ == "__main__":
    main()
