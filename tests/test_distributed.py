"""The GPU path's parts that a CPU can check (asyncwebrl/distributed.py, asyncwebrl/vllm_engine.py, the trainer's
numerics): fp32 master weights that an lr 5e-6 step moves, a refresh that times out loudly, the vLLM refresh's calls
in order, and a dead trainer rank that is an error, not a hang. The placement maps are in test_05_train.py."""
import asyncio
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from asyncwebrl import ROOT, load
from asyncwebrl import vllm_engine

pol = load("02_policy")


def test_the_trainer_keeps_fp32_master_weights_that_a_bf16_step_at_lr_5e6_moves(tiny_dir, shot_store):
    """bf16 compute (autocast), fp32 weights: one AdamW step at the paper's lr changes nearly every weight. The
    same step on bf16 weights rounds most of the changes away."""
    cfg = pol.PolicyConfig(model=str(tiny_dir), dtype="bfloat16")
    policy = pol.Policy(cfg)
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32} and policy.dtype == torch.bfloat16
    obs = load("01_env").Observation(goal="Click OK.", url="x", screenshot="ep:0", elements=())
    turn = policy.turn(obs, pol.AgentState())
    reply = policy.tokenizer("Memory: a\nAction: click(#0)")["input_ids"]

    def moved_fraction(model) -> float:
        w = model.model.language_model.layers[0].mlp.up_proj.weight
        before = w.detach().clone()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-6, weight_decay=0.01)
        logp, mask = policy.logprobs([turn], [reply], shot_store)
        (-logp[mask].sum()).backward()
        opt.step()
        return (w.detach() != before).float().mean().item()

    assert moved_fraction(policy.model) > 0.99
    policy.model.to(torch.bfloat16)  # what the trainer did before: bf16 weights, gradients and AdamW state
    assert moved_fraction(policy.model) < 0.5


class _Engine:
    """Stands in for vLLM's AsyncLLM: records the refresh's calls; `hang` makes the weight load never return."""

    def __init__(self, hang=False):
        self.calls, self.hang, self.engine_core = [], hang, self

    async def pause_generation(self, **kw):
        self.calls.append(("pause", kw))

    async def call_utility_all_async(self, method, *args):
        self.calls.append((method, args))
        if self.hang:
            await asyncio.sleep(3600)
        return [["4:aa"], ["4:aa"]]  # two data-parallel engines, one worker each

    async def resume_generation(self):
        self.calls.append(("resume",))


def _sampler(engine, timeout_s=600.0):
    sampler = vllm_engine.VLLMSampler.__new__(vllm_engine.VLLMSampler)  # no vLLM here: only the refresh's logic
    sampler.engine, sampler.version, sampler.llm = vllm_engine.EngineConfig(refresh_timeout_s=timeout_s), 0, engine
    return sampler


def _with_loop(body):
    """Run body(sampler_loop) from a second thread while an event loop runs, as the trainer thread does."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        return body(loop)
    finally:
        loop.call_soon_threadsafe(loop.stop)


def test_the_vllm_refresh_pauses_loads_on_every_engine_and_resumes():
    engine = _Engine()
    sampler = _sampler(engine)

    def body(loop):
        sampler.loop = loop
        return sampler.load_weights("/dev/shm/w/v3", 3)

    assert _with_loop(body) == ["4:aa", "4:aa"] and sampler.version == 3
    assert engine.calls == [("pause", {"mode": "keep", "clear_cache": True}),
                            ("collective_rpc", ("load_weights_file", None, ("/dev/shm/w/v3",), None)),
                            ("resume",)]


def test_a_refresh_that_never_returns_is_an_error_within_its_timeout():
    sampler = _sampler(_Engine(hang=True), timeout_s=0.5)

    def body(loop):
        sampler.loop = loop
        t0 = time.time()
        with pytest.raises(RuntimeError, match="did not load the weights of version 1 within 0.5 s"):
            sampler.load_weights("/dev/shm/w/v1", 1)
        return time.time() - t0

    assert _with_loop(body) < 5 and sampler.version == 0


def test_a_dead_trainer_rank_is_an_error_not_a_hang():
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "dead_rank.py"), "60"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    line = [x for x in r.stdout.splitlines() if x.startswith("rank 0:")]
    assert line and "no error" not in line[0], r.stdout + r.stderr[-2000:]
    assert float(line[0].split(" after ")[1].split()[0]) < 60  # well within the group's timeout


def test_the_gpu_check_script_runs_on_a_cpu(tmp_path):
    from experiments import gpu_check

    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "g.json"), "--matrix", "512"]) == 0
    result = __import__("json").loads((tmp_path / "g.json").read_text())
    assert result["ok"] and result["hf_refresh"]["digest_match"] and result["adamw_step_moved"]["bf16"] < 0.5


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300) | st.builds(lambda h, tail: len(h).to_bytes(8, "little") + h + tail,
                                           st.text(max_size=120).map(str.encode), st.binary(max_size=64)))
def test_any_weight_file_is_loaded_or_refused_with_a_typed_error(tmp_path_factory, data):
    """A refresh folder holding any bytes (a torn write, another tool's file): the engine loads it or raises a typed
    error, quickly; it never half-loads silently (the digest would then differ from the trainer's anyway)."""
    from safetensors import SafetensorError

    from asyncwebrl import weights

    folder = tmp_path_factory.mktemp("w")
    (folder / "model-00000.safetensors").write_bytes(data)
    model = torch.nn.Linear(2, 2)
    t0 = time.time()
    try:
        weights.load_into(model, folder)
    except (RuntimeError, ValueError, OSError, KeyError, SafetensorError):
        pass
    assert time.time() - t0 < 2
