"""The GPU path's checks in one script (a few minutes on one GPU; no browser, no network):

    python -m experiments.gpu_check [--out figures/gpu_check.json]

1. Trainer numerics: one AdamW step at the paper's lr 5e-6 on a 4096 x 4096 matrix of std 0.02, with fp32 master
   weights and with bf16 weights: the share of weights that moved (issue: bf16 rounds most of the step away).
2. The same on the tiny policy as the trainer holds it (fp32 weights, bf16 compute).
3. The refresh: the trainer writes its weights as files (bf16), the transformers engine loads them, and the digests
   agree; then the log-prob gap between what the engine sampled and what the trainer computes for the same tokens.
4. Where vLLM is installed: the same refresh and log-prob gap with the vLLM engine (asyncwebrl/vllm_engine.py).

Every number goes to the JSON file; the exit status is 1 if a check fails. `--device cpu` runs 1-3 on a CPU (the
test suite does, to keep the script working).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from asyncwebrl import ROOT, load, weights

env, pol = load("01_env"), load("02_policy")


def adamw_moves(dtype: torch.dtype, device: str, n: int = 4096) -> float:
    torch.manual_seed(0)
    w = torch.nn.Parameter((torch.randn(n, n, device=device) * 0.02).to(dtype))
    before = w.detach().clone()
    opt = torch.optim.AdamW([w], lr=5e-6, weight_decay=0.01)
    w.grad = torch.randn_like(w) * 1e-3
    opt.step()
    return (w.detach() != before).float().mean().item()


def _batch(policy, store):
    from PIL import Image, ImageDraw
    import io

    turns = []
    for i, goal in enumerate(("Click on the OK button.", "Type hello into the box.", "Select the red square.")):
        img = Image.new("RGB", (160, 210), "white")
        ImageDraw.Draw(img).rectangle((20 + 30 * i, 50, 90, 80), fill="red")
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        key = store.put(f"gpu-check-{i}", buf.getvalue())
        elements = tuple(env.Element(k, "button", f"b{k}", (10.0, 10.0 + 20 * k, 40.0, 15.0)) for k in range(3))
        turns.append(policy.turn(env.Observation(goal, "http://x/", key, elements), pol.AgentState()))
    return turns


def logprob_gap(policy, samples, turns, store) -> dict:
    with torch.no_grad():
        logp, mask = policy.logprobs(turns, [s.token_ids for s in samples], store)
    gaps = [abs(float(logp[i, k]) - s.logprobs[k]) for i, s in enumerate(samples) for k in range(len(s.token_ids))]
    return dict(max=max(gaps), mean=sum(gaps) / len(gaps), tokens=len(gaps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default) | cpu")
    p.add_argument("--out", default=str(ROOT / "figures" / "gpu_check.json"), help="where the JSON result goes")
    p.add_argument("--matrix", type=int, default=4096, help="side of the matrix of check 1 (default 4096)")
    args = p.parse_args(argv)
    dev, result, ok = args.device, {"device": args.device, "torch": torch.__version__}, True
    if dev.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
    t0 = time.time()

    moved = {name: adamw_moves(dtype, dev, args.matrix) for name, dtype in (("fp32", torch.float32),
                                                                           ("bf16", torch.bfloat16))}
    result["adamw_step_moved"] = moved
    ok &= moved["fp32"] > 0.99
    print(f"1. AdamW lr 5e-6: {moved['fp32']:.1%} of fp32 weights moved, {moved['bf16']:.1%} of bf16 weights")

    store = env.ScreenshotStore()
    cfg = pol.PolicyConfig(constrained=False, device=dev, dtype="bfloat16", max_new_tokens=16)
    policy = pol.Policy(cfg)
    turns = _batch(policy, store)
    w = policy.model.model.language_model.layers[0].mlp.up_proj.weight
    before = w.detach().clone()
    opt = torch.optim.AdamW([q for q in policy.model.parameters() if q.requires_grad], lr=5e-6)
    reply = policy.tokenizer("Memory: a\nAction: click(#0)")["input_ids"]
    logp, mask = policy.logprobs(turns[:1], [reply], store)
    (-logp[mask].sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    result["policy_step_moved"] = (w.detach() != before).float().mean().item()
    result["policy_weight_dtype"] = str(w.dtype)
    ok &= result["policy_step_moved"] > 0.99 and w.dtype == torch.float32
    print(f"2. tiny policy, fp32 master weights, bf16 compute: {result['policy_step_moved']:.1%} moved")

    folder = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "v1"
    sampler = pol.HFSampler(pol.PolicyConfig(constrained=False, device=dev, max_new_tokens=16))
    wrote = weights.write(policy.model.state_dict().items(), folder, sampler.weights_dtype)
    held = sampler.load_weights(str(folder), 1)
    torch.manual_seed(0)
    samples = sampler.sample(turns, store)
    result["hf_refresh"] = dict(digest_match=held == [wrote], **logprob_gap(policy, samples, turns, store))
    ok &= held == [wrote]
    print(f"3. transformers engine: digest {'matches' if held == [wrote] else 'DIFFERS'}; log-prob gap "
          f"max {result['hf_refresh']['max']:.4f}, mean {result['hf_refresh']['mean']:.4f}")

    try:
        import vllm  # noqa: F401
    except ImportError:
        result["vllm"] = "not installed"
    if not dev.startswith("cuda") or result.get("vllm"):
        result["vllm"] = result.get("vllm", "needs a GPU")
        print(f"4. vLLM: {result['vllm']}, skipped")
    else:
        result["vllm"] = check_vllm(policy, turns, store, folder)
        ok &= result["vllm"]["digest_match"]
    result.update(seconds=round(time.time() - t0, 1), ok=bool(ok))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'all checks passed' if ok else 'A CHECK FAILED'}; {args.out}")
    return 0 if ok else 1


def check_vllm(policy, turns, store, folder) -> dict:
    from asyncwebrl.vllm_engine import EngineConfig, VLLMSampler

    sampler = VLLMSampler(policy.cfg, EngineConfig(gpu_memory_utilization=0.3, max_model_len=4096))

    async def run():
        await sampler.start()
        t0 = time.time()
        held = await asyncio.to_thread(sampler.load_weights, str(folder), 1)
        load_s = time.time() - t0
        samples = await asyncio.gather(*[sampler.asample(t, store) for t in turns])
        return held, load_s, samples

    try:
        held, load_s, samples = asyncio.run(run())
    finally:
        sampler.close()
    out = dict(digest_match=held == [weights.digest_of(folder)], load_s=round(load_s, 2),
               **logprob_gap(policy, samples, turns, store))
    print(f"4. vLLM engine: digest {'matches' if out['digest_match'] else 'DIFFERS'}; load {load_s:.1f} s; "
          f"log-prob gap max {out['max']:.4f}, mean {out['mean']:.4f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
