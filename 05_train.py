"""05 - Training: the whole pipeline from the command line.

    python 05_train.py                       tiny model, CPU, MiniWoB++ train tasks, async, 1/k, decoupled loss
    python 05_train.py --preset paper --gpus 8 --model Qwen/Qwen3-VL-8B-Instruct
    python 05_train.py --resume runs/<run>   continue from the run's latest checkpoint
    python 05_train.py --dry-run --gpus 8    print the placement and the resolved config, then exit
    python 05_train.py --preset tiny-learn   warm start (behaviour cloning on scripted demonstrations), then RL

Configuration is one dataclass (TrainConfig): defaults < --preset < --config FILE (JSON) < command-line flags. The
resolved config is saved in the run directory, which also receives:
    metrics.jsonl          one row per update (success, steps, tokens, loss metrics, clip rates, staleness, speed)
    timeline.jsonl         every component's timed spans (env steps, inference, train, refresh, idle)
    trajectories/v<N>/     a few trained trajectories per update: replies, actions and their screenshots
    checkpoints/v<N>/      model (loadable with from_pretrained), optimizer, RNG and task-sampler state
    warmstart/             with --warmstart-steps: the cloned model (version 0), its loss log and data stats

In the package: the run directory and checkpoints (asyncwebrl/rundir.py), config checks (configs.py), the several
GPUs and nodes (distributed.py: placement, FSDP2 trainer ranks), the vLLM engine (vllm_engine.py), the warm start
(warmstart.py). Changed from the paper: on a CPU the default is the tiny model on six easy MiniWoB++ tasks with a
few short updates, and the tiny-learn preset first clones scripted demonstrations (a stand-in for the pretrained
VLM the paper starts from); `--preset paper` holds the released configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asyncwebrl import distributed as dist, load
from asyncwebrl.configs import UsageError, check_placement, json_object, load_tasks, validate
from asyncwebrl.rundir import Run, extra_loggers, progress_bar

env = load("01_env")
policy_mod = load("02_policy")
loss_mod = load("03_grpo_loss")
loop_mod = load("04_async_loop")


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


TINY_TASKS = "click-button,click-link,click-dialog,click-test-2,focus-text,click-tab"
# tiny-learn: train tasks a random agent often fails (so a group's rewards differ and GRPO has a signal), each with a
# scripted solver for the warm start; one to three actions, so a 5M-parameter model can learn them on 2 cores.
# (enter-text was tried and left out: copying a string was not learnt in the warm start's few minutes.)
LEARN_TASKS = "click-button,click-link,click-tab,click-dialog-2,focus-text-2,click-button-sequence,click-collapsible"


@dataclass
class TrainConfig:
    # run
    run_dir: str = opt("", "run directory (default: runs/<date>-<time>-<preset>)")
    seed: int = opt(0, "seed of the task sampler, the sampler and the weights' updates")
    updates: int = opt(8, "train until this policy version (a resumed run continues the count); 0 = warm start only")
    checkpoint_every: int = opt(4, "save a checkpoint every this many updates (and at the end)")
    keep_checkpoints: int = opt(2, "checkpoints kept on disk (older ones are deleted)")
    log_trajectories: int = opt(2, "trajectories saved with their screenshots per update, for inspection")
    tensorboard: bool = opt(False, "also log scalars to RUN_DIR/tensorboard (needs `pip install tensorboard`)")
    wandb_project: str = opt("", "also log to this Weights & Biases project (needs `pip install wandb`)")
    # tasks
    task_file: str = opt("", "a WebGym task file (JSONL or JSON list) instead of MiniWoB++; bad rows are reported "
                         "and skipped")
    task_file_strict: bool = opt(False, "a bad row of --task-file is an error instead of being skipped")
    tasks: str = opt(TINY_TASKS, "comma-separated MiniWoB++ task names; 'all' = every task of --split")
    split: str = opt("train", "task split to train on: train | test")
    judge: str = opt("rubric_keywords", "judge of WebGym answers: rubric_keywords (keyword match, offline) | chat (an "
                     "LLM judge at --judge-url, asyncwebrl/judge.py; API key from $OPENAI_API_KEY)")
    judge_url: str = opt("", "OpenAI-compatible base URL of the judge, e.g. http://localhost:8000/v1 (vllm serve)")
    judge_model: str = opt("", "model name the judge endpoint serves, e.g. gemini-2.5-flash")
    max_steps: int = opt(0, "episode horizon; 0 = the task's own (10 / 20 / 30 for easy / medium / hard)")
    # warm start (stands in for pretraining: behaviour cloning on scripted demonstrations, asyncwebrl/warmstart.py)
    warmstart_steps: int = opt(0, "behaviour-cloning steps before RL; 0 = none (RL from the --model weights)")
    warmstart_episodes: int = opt(160, "scripted demonstration episodes played for the warm start")
    # policy
    model: str = opt(str(policy_mod.TINY_MODEL_DIR), "model path or hub name (the tiny model is built if absent)")
    engine: str = opt("auto", "rollout engine: hf (transformers generate, in the trainer's process) | hf-process "
                      "(the same in a process of its own) | vllm | auto (vllm on GPU if installed, else hf)")
    history: int = opt(3, "past actions shown in the prompt")
    images: int = opt(1, "screenshots in the prompt (the latest N)")
    max_new_tokens: int = opt(48, "reply budget in tokens")
    memory_tokens: int = opt(24, "constrained decoding: the memory line ends by this many tokens")
    temperature: float = opt(1.0, "sampling temperature (the loss uses the same)")
    constrained: str = opt("auto", "grammar-constrained replies: on | off | auto (on for the tiny model)")
    # loop
    mode: str = opt("async", "async (everlasting pool, overlapped trainer) | sync (rollout all -> train -> refresh)")
    workers: int = opt(8, "concurrent episodes (browser pages)")
    group_size: int = opt(4, "G: trajectories per task group")
    batch_groups: int = opt(2, "B: groups per update")
    max_staleness: int = opt(2, "admission bound: episodes start only while the data in flight is at most this "
                             "many versions ahead of training (the released code's max_head_offpolicyness)")
    drop_stale: bool = opt(False, "also drop groups older than --max-staleness when the trainer takes them (the "
                           "released code does not: it trains them with their importance weights)")
    dynamic_sampling: bool = opt(True, "reject groups whose rewards are all equal")
    # loss
    normalizer: str = opt("const", "step normalizer: const (1/k, the paper's) | traj (1/|tau_i|)")
    k: float = opt(10.0, "the constant k of 1/k (the Easy training horizon)")
    adv_std: str = opt("unbiased", "group std of the advantage: unbiased (1/(G-1), the released code) | population")
    decoupled: bool = opt(True, "decoupled PPO (clip pi/pi_prox, weight by pi_prox/pi_behave); off: coupled")
    eps_clip: float = opt(0.2, "PPO clip range")
    # optimizer
    lr: float = opt(1e-4, "AdamW learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    grad_clip: float = opt(1.0, "gradient norm clip")
    epochs: int = opt(1, "passes over each batch")
    minibatches: int = opt(1, "optimizer steps per pass")
    micro_batch: int = opt(16, "steps per forward/backward (gradient accumulation)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (8B on 80 GB cards)")
    # placement (asyncwebrl/distributed.py)
    gpus: int = opt(-1, "GPUs per node; -1 = all visible (0 on a CPU machine)")
    nodes: int = opt(1, "machines, each with --gpus GPUs split the same way (torchrun --nnodes; see the README)")
    rollout_gpus: int = opt(0, "of each node's GPUs, how many serve rollout (a vLLM replica each); 0 = 3/4 of "
                            "them, as the paper's 48:16")
    trainer_procs: int = opt(1, "CPU only: trainer processes sharding the model with FSDP2 over gloo (as on GPUs)")
    dist_timeout_min: float = opt(60.0, "trainer ranks: how long one may wait for the others (vLLM start-up and the "
                                  "first batch come first) before a dead rank is an error")
    weights_dir: str = opt("", "folder for each refresh's weight files; \"\" = a RAM folder (/dev/shm); several "
                           "nodes: a folder every node sees")
    # vLLM engine (asyncwebrl/vllm_engine.py); the defaults fit Qwen3-VL-8B on an 80 GB card per replica
    max_model_len: int = opt(16384, "vLLM: prompt + reply tokens (the model's own 256K would reserve ~36 GiB of "
                             "KV cache)")
    gpu_memory_utilization: float = opt(0.85, "vLLM: share of each rollout GPU for weights and KV cache")
    enforce_eager: bool = opt(False, "vLLM: no CUDA graphs (starts faster, decodes slower)")


PRESETS = {
    "tiny": {},  # the dataclass defaults: a laptop CPU, a few minutes
    # issue 8's recipe: warm start (behaviour cloning) then RL on tasks a tiny model can learn on 2 cores
    # horizon 4 = about twice the optimal 1-3 steps (the paper: k = 10 for ~5-step successes), k = the horizon;
    # 72 updates: 15-19 min of RL on 2 cores here, the most that fits issue 8's 30 minutes with the warm start
    "tiny-learn": dict(tasks=LEARN_TASKS, warmstart_steps=60, warmstart_episodes=160, max_steps=4, k=4.0,
                       batch_groups=4, epochs=2, minibatches=2, lr=1e-4, updates=72, checkpoint_every=8,
                       keep_checkpoints=4),
    "paper": dict(model=policy_mod.PAPER_MODEL, engine="vllm", tasks="all", group_size=8, batch_groups=16,
                  epochs=3, minibatches=2, lr=5e-6, images=2, max_new_tokens=512, constrained="off", workers=128,
                  updates=300, checkpoint_every=10, micro_batch=4, gradient_checkpointing=True),
}


# ----------------------------------------------------------------------------------------------------------------
# Command line: every TrainConfig field is a flag; defaults < preset < --config file < flags given.


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter,
                                argument_default=argparse.SUPPRESS)  # only flags actually given reach the config
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="starting point: tiny (CPU default) | tiny-learn (warm start + RL that learns on a CPU) | paper")
    p.add_argument("--config", metavar="FILE", help="JSON file of TrainConfig fields")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the placement and the config, then exit")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), metavar=f.name.upper(),
                           help=help_text)
    return p


def resolve(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    args = vars(parser().parse_args(argv))
    meta = {k: args.pop(k, None) for k in ("preset", "config", "resume", "dry_run")}
    values: dict = {}
    if meta["resume"]:  # the resumed run's own config, then whatever the command line changes (e.g. --updates)
        saved = Path(meta["resume"]) / "config.json"
        if not saved.is_file():
            raise UsageError(f"--resume {meta['resume']}: no config.json there (not a run directory?)")
        values.update(json_object(saved, "--resume", key="config"))
        values["run_dir"] = meta["resume"]
    values.update(PRESETS[meta["preset"] or "tiny"] if not meta["resume"] else {})
    if meta["config"]:
        values.update(json_object(Path(meta["config"]), "--config"))
    values.update(args)
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise UsageError(f"unknown config field(s): {sorted(unknown)}")
    cfg = TrainConfig(**values)
    if not cfg.run_dir and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("under torchrun every rank must name the same run: pass --run-dir")
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{meta['preset'] or 'tiny'}")
    return cfg, argparse.Namespace(**meta)


def check(cfg: TrainConfig, dry_run: bool = False) -> None:
    """Every bad input found before anything starts, each as one clear sentence (asyncwebrl/configs.py). A dry run
    plans for GPUs this machine may not have."""
    validate(cfg, dry_run)
    check_placement(cfg, placement(cfg, cfg.gpus if dry_run and cfg.gpus >= 0 else None), dry_run)
    load_tasks(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Placement: which device does what.


def placement(cfg: TrainConfig, gpus: int | None = None) -> dist.Placement:
    """This run's map of nodes, GPUs and roles (asyncwebrl/distributed.py). `gpus`: plan for that many, not for
    what this machine has (the dry run)."""
    gpus = gpus if gpus is not None else torch.cuda.device_count() if cfg.gpus < 0 else cfg.gpus
    procs = int(os.environ.get("WORLD_SIZE", cfg.trainer_procs)) if gpus == 0 else 1  # torchrun decides, if it ran us
    try:
        return dist.plan(gpus, cfg.nodes, cfg.rollout_gpus, procs, cfg.engine)
    except dist.PlacementError as e:
        raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------------
# Training


def policy_config(cfg: TrainConfig, place: dist.Placement, model: str | None = None, local_rank: int = 0):
    return policy_mod.PolicyConfig(model=model or cfg.model, history=cfg.history, images=cfg.images,
                                   max_new_tokens=cfg.max_new_tokens, memory_tokens=cfg.memory_tokens,
                                   temperature=cfg.temperature,
                                   constrained=None if cfg.constrained == "auto" else cfg.constrained == "on",
                                   device=place.trainer_device(local_rank) if place.gpus else None,
                                   gradient_checkpointing=cfg.gradient_checkpointing)


def engine_config(cfg: TrainConfig, place: dist.Placement):
    from asyncwebrl.vllm_engine import EngineConfig  # a replica per rollout GPU of every node

    return EngineConfig.of_run(cfg, place)


def build(cfg: TrainConfig, pcfg, store, tasks: list, version: int = 0, world: int = 1, place=None,
          **loop_overrides):
    """Policy (trainer side), sampler (rollout side, its own copy of the weights), learner and loop."""
    place = place or placement(cfg)
    rollout_device = "cuda:0" if place.gpus else None  # the first rollout GPU (vLLM places its replicas itself)
    sampler = policy_mod.make_sampler(dataclasses.replace(pcfg, device=rollout_device, gradient_checkpointing=False),
                                      cfg.engine, engine_config(cfg, place))
    sampler.version = version
    policy, learner = make_learner(cfg, pcfg, store, rank=0, world=world)
    if world > 1:
        learner = dist.ShardedLearner(learner)
    loop_cfg = loop_mod.LoopConfig(**{**dict(mode=cfg.mode, workers=cfg.workers, group_size=cfg.group_size,
                                             batch_groups=cfg.batch_groups, max_staleness=cfg.max_staleness,
                                             drop_stale=cfg.drop_stale, dynamic_sampling=cfg.dynamic_sampling,
                                             updates=cfg.updates, weights_dir=cfg.weights_dir,
                                             seed=cfg.seed), **loop_overrides})
    loop = loop_mod.Loop(loop_cfg, env.BrowserEnvs(store), sampler, learner, tasks, store)
    return policy, sampler, learner, loop


def make_learner(cfg: TrainConfig, pcfg, store, rank: int = 0, world: int = 1):
    policy = policy_mod.Policy(pcfg)
    if world > 1:
        dist.shard(policy.model)  # before the optimizer is made: it must hold the sharded parameters
    learner = loop_mod.Learner(policy, store,
                               loss_mod.LossConfig(normalizer=cfg.normalizer, k=cfg.k, decoupled=cfg.decoupled,
                                                   eps_clip=cfg.eps_clip, std=cfg.adv_std),
                               loop_mod.LearnerConfig(lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                      grad_clip=cfg.grad_clip, epochs=cfg.epochs,
                                                      minibatches=cfg.minibatches, micro_batch=cfg.micro_batch),
                               rank=rank, world=world)
    return policy, learner


# ----------------------------------------------------------------------------------------------------------------
# Several trainer devices (FSDP2, data parallel) and several nodes: asyncwebrl/distributed.py has the machinery.
# Rank 0 runs the pipeline above; the other ranks follow it. Started by torch.multiprocessing.spawn on one node,
# by torchrun on several (it only needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).


def _rank_main(rank: int, cfg: TrainConfig, place: dist.Placement, port: int) -> None:
    """mp.spawn's entry: one trainer process on this machine."""
    _rank(cfg, place, rank, place.world, rank, port)


def _rank(cfg: TrainConfig, place: dist.Placement, rank: int, world: int, local_rank: int, port: int | None) -> None:
    """One trainer process (asyncwebrl/distributed.py): rank 0 runs the pipeline; the others build their shard of
    the learner as rank 0 does (from the latest checkpoint, if any) and follow its updates."""
    policy_mod.quiet_libraries()  # each rank loads the model: no loading bars across the run's progress

    def follower():
        ckpt = Run(cfg).latest_checkpoint()
        pcfg = policy_config(cfg, place, str(ckpt / "model") if ckpt is not None else None, local_rank)
        _, learner = make_learner(cfg, pcfg, None, rank, world)
        if ckpt is not None:
            learner.optimizer.load_state_dict(torch.load(ckpt / f"optimizer.rank{rank}.pt", weights_only=False))
        return learner

    def headless():  # on nodes 1+, local rank 0 also starts the node's vLLM replicas (rank 0's engine drives them)
        from asyncwebrl.vllm_engine import start_headless

        return start_headless(policy_config(cfg, place), engine_config(cfg, place), rank // place.trainer)

    dist.run_rank(rank, world, local_rank, port, place, cfg.dist_timeout_min * 60,
                  lead=lambda: _train(cfg, place, rank, world), follower=follower, headless=headless)


def warm_start(cfg: TrainConfig) -> TrainConfig:
    """Behaviour cloning on scripted demonstrations before RL (asyncwebrl/warmstart.py); its model
    (RUN_DIR/warmstart/model) is the run's version 0, and the config from here on points at it. Done once: a resumed
    run finds it on disk."""
    folder = Path(cfg.run_dir) / "warmstart" / "model"
    if not (folder / "config.json").is_file():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("under torchrun, warm-start first in one process (--warmstart-steps N --updates 0), "
                             "then pass --model RUN_DIR/warmstart/model")
        from asyncwebrl.warmstart import WarmstartConfig, warm_start as clone_demonstrations

        wcfg = WarmstartConfig(steps=cfg.warmstart_steps, episodes=cfg.warmstart_episodes, workers=cfg.workers,
                               seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        try:
            clone_demonstrations(policy_mod.Policy(policy_config(cfg, placement(cfg))), load_tasks(cfg), wcfg, folder)
        except (ValueError, RuntimeError) as e:
            raise UsageError(str(e))
    return dataclasses.replace(cfg, model=str(folder))


def train(cfg: TrainConfig) -> Path:
    if cfg.warmstart_steps > 0:
        cfg = warm_start(cfg)
        if cfg.updates == 0:
            Run(cfg).save_config()
            print(f"done: the warm start alone; results in {cfg.model}; evaluate them with: python 06_eval.py "
                  f"{cfg.model}")
            return Path(cfg.run_dir)
    place = placement(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun (one node or several): we are one rank
        world = int(os.environ["WORLD_SIZE"])
        if place.gpus:
            try:
                dist.check_launch(place, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
            except dist.PlacementError as e:
                raise UsageError(str(e)) from None
        _rank(cfg, place, int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]), None)
        return Path(cfg.run_dir)
    if place.nodes > 1:
        raise UsageError(f"--nodes {place.nodes}: start every node with torchrun (README, 'Several nodes')")
    if place.world > 1:  # one process per trainer device, started by torch's own launcher
        import torch.multiprocessing as mp

        if Path(cfg.model).resolve() == policy_mod.TINY_MODEL_DIR.resolve():
            policy_mod.build_tiny_model()  # once, here, not by every rank at the same time
        port = dist.free_port()
        mp.spawn(_rank_main, args=(cfg, place, port), nprocs=place.world, join=True)
        return Path(cfg.run_dir)
    return _train(cfg, place)


def _train(cfg: TrainConfig, place: dict, rank: int = 0, world: int = 1) -> Path:
    run = Run(cfg)
    run.save_config()
    print("\n".join(place.describe()))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tasks = load_tasks(cfg)
    ckpt, version, model = run.latest_checkpoint(), 0, None
    if ckpt is not None:
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        version, model = state["version"], str(ckpt / "model")
        print(f"resuming {run.dir} from {ckpt.name} (version {version})")
    spent = run.rewind(version)  # a killed run's lost updates go; its clock counts on
    store = env.ScreenshotStore()
    policy, sampler, learner, loop = build(cfg, policy_config(cfg, place, model), store, tasks, version,
                                           world=world, place=place)
    if ckpt is not None:
        run.restore(ckpt, learner, loop.pool, tasks, rank, sharded=world > 1)
    if version >= cfg.updates:
        print(f"nothing to do: version {version} >= --updates {cfg.updates}")
        return run.dir
    sinks = extra_loggers(cfg, run.dir)
    bar = progress_bar(cfg, version)

    def on_update(m: dict, groups) -> None:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}
        row.update(time_s=round(m["time_s"] + spent, 6), utilisation=loop.timeline.utilisation())
        run.log_metrics(row)
        loop.timeline.flush(run.dir / "timeline.jsonl", offset=spent)  # a kill loses at most this update's spans
        for sink in sinks:
            sink(row)
        run.log_trajectories(groups, store, m["version"])
        if m["version"] % cfg.checkpoint_every == 0 or m["version"] == cfg.updates:
            run.save_checkpoint(policy, learner, loop.pool, m["version"])
        bar.set_postfix_str(f"success {m['success']:.2f} | steps {m['steps']:.1f} | {m['samples_per_s']:.2f} "
                            f"samples/s | staleness {m['staleness_mean']:.1f} | loss {m['loss']:+.4f}")
        bar.update(1)

    loop.on_update = on_update
    try:
        loop.run()
    finally:
        bar.close()
        loop.timeline.flush(run.dir / "timeline.jsonl", offset=spent)
        if world > 1:
            learner.stop()
    print(f"done: version {loop.version}; results in {run.dir}; evaluate them with: python 06_eval.py {run.dir}")
    return run.dir


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    policy_mod.quiet_libraries()
    try:
        cfg, meta = resolve(argv)
        check(cfg, meta.dry_run)
        if meta.dry_run:
            print("\n".join(placement(cfg, cfg.gpus if cfg.gpus >= 0 else None).describe()))
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return 0
        train(cfg)
    except UsageError as e:
        print(f"05_train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the latest checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
