"""Reading and checking 05_train.py's configuration: a JSON file of fields, the types, bounds and choices of every
field (checked once, whatever set the value: default, preset, --config file or flag), the model, the optional
loggers, the GPUs against the placement, the tasks it names (load_tasks), and a model's size from its config alone.
Every bad input becomes one UsageError sentence; 05 prints it and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path

import torch

from asyncwebrl import distributed as dist, suites
from asyncwebrl.tiny_model import TINY_MODEL_DIR


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def json_object(path: Path, flag: str, key: str | None = None) -> dict:
    """A JSON object read from a file (or its `key` member), or a UsageError that says what is wrong with it."""
    try:
        value = json.loads(path.read_text())
        value = value[key] if key is not None else value
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, IndexError) as e:
        raise UsageError(f"{flag} {path}: cannot read it ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} {path}: expected a JSON object of config fields, got {type(value).__name__}")
    return value


# Bounds of every numeric field, checked once here whatever set the value (default, preset, --config file, flag).
AT_LEAST = dict(seed=0, updates=0, checkpoint_every=1, keep_checkpoints=1, log_trajectories=0, max_steps=0,
                warmstart_steps=0, warmstart_episodes=1, history=0, images=1, max_new_tokens=1, memory_tokens=1,
                workers=1, group_size=2, batch_groups=1, max_staleness=0, epochs=1, minibatches=1, micro_batch=1,
                gpus=-1, nodes=1, rollout_gpus=0, trainer_procs=1, weight_decay=0.0, max_model_len=256)
AT_MOST = dict(gpus=1024, nodes=4096, rollout_gpus=1024, trainer_procs=1024)  # a typo, not a cluster
POSITIVE = ("lr", "temperature", "eps_clip", "grad_clip", "k", "dist_timeout_min", "gpu_memory_utilization")
CHOICES = dict(engine=("auto", "hf", "hf-process", "vllm"), split=("train", "test"),
               constrained=("auto", "on", "off"),
               mode=("async", "sync"), normalizer=("const", "traj"), judge=("rubric_keywords", "chat"),
               adv_std=("unbiased", "population"))


def validate(cfg, dry_run: bool = False) -> None:
    """Types, bounds and choices of every field, then the model, the loggers and the GPUs asked for: one clear
    sentence for the first one that is wrong. A dry run plans for GPUs (and a model) this machine may not have."""
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
        if not isinstance(value, kind) or (isinstance(value, bool) and f.type != "bool"):
            raise UsageError(f"{flag} must be {'a number' if f.type == 'float' else f.type}, got {value!r:.60}")
        if f.type == "float" and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value!r}")
        if f.name == "group_size" and value < 2:
            raise UsageError("--group-size must be at least 2: GRPO compares trajectories within a group")
        if f.name in AT_LEAST and value < AT_LEAST[f.name]:
            raise UsageError(f"{flag} must be at least {AT_LEAST[f.name]}, got {value}")
        if f.name in AT_MOST and value > AT_MOST[f.name]:
            raise UsageError(f"{flag} must be at most {AT_MOST[f.name]}, got {value}")
        if f.name in POSITIVE and value <= 0:
            raise UsageError(f"{flag} must be greater than 0, got {value}")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise UsageError(f"{flag} must be one of {', '.join(CHOICES[f.name])}, got {value!r}")
    if cfg.gpu_memory_utilization > 1:
        raise UsageError(f"--gpu-memory-utilization is a share of the GPU, at most 1; got {cfg.gpu_memory_utilization}")
    if cfg.eps_clip >= 1:
        raise UsageError(f"--eps-clip must be below 1 (the ratio is clipped to [1 - eps, 1 + eps]), got {cfg.eps_clip}")
    if cfg.updates == 0 and cfg.warmstart_steps <= 0:
        raise UsageError("--updates must be at least 1 (0 only with --warmstart-steps: a warm start alone)")
    if cfg.judge == "chat" and not (cfg.judge_url and cfg.judge_model):
        raise UsageError("--judge chat needs --judge-url and --judge-model")
    model, tiny = Path(cfg.model), Path(cfg.model).resolve() == TINY_MODEL_DIR.resolve()  # tiny: built on first use
    if not dry_run and not model.exists() and not tiny:
        if cfg.model.startswith((".", "/", "~")) or os.environ.get("HF_HUB_OFFLINE") == "1" or model.suffix:
            raise UsageError(f"--model {cfg.model}: no such directory (and not a hub name that can be fetched)")
    if model.exists() and not (model / "config.json").is_file() and not tiny:
        raise UsageError(f"--model {cfg.model}: not a model directory (no config.json in it)")
    for flag, wanted, package in (("--tensorboard", cfg.tensorboard, "tensorboard"),
                                  ("--wandb-project", cfg.wandb_project, "wandb")):
        if wanted and importlib.util.find_spec(package) is None:
            raise UsageError(f"{flag} needs `pip install {package}`")
    if cfg.gpus > torch.cuda.device_count() and not dry_run:
        raise UsageError(f"--gpus {cfg.gpus}: this machine has {torch.cuda.device_count()} GPU(s)")


def check_placement(cfg, place: dist.Placement, dry_run: bool = False) -> None:
    """What the placement needs: a folder every node sees, and room for the trainer beside a shared GPU's engine."""
    if place.nodes > 1 and not cfg.weights_dir:
        raise UsageError(f"--nodes {place.nodes}: pass --weights-dir, a folder every node sees (the engines on the "
                         f"other nodes read each refresh's weights from it)")
    tiny = Path(cfg.model).resolve() == TINY_MODEL_DIR.resolve()
    if place.shared and cfg.engine == "vllm" and not dry_run and not tiny:
        params, memory = model_params(cfg.model), torch.cuda.get_device_properties(0).total_memory
        if not dist.fits_one_gpu(params, memory, cfg.gpu_memory_utilization):
            size = f"{params / 1e9:.1f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"
            raise UsageError(f"--gpus 1: training {size} parameters (fp32 weights, gradients and AdamW: "
                             f"~{16 * params / 2**30:.0f} GiB) does not fit beside the engine's "
                             f"{cfg.gpu_memory_utilization:.0%} of {memory / 2**30:.0f} GiB; use --gpus 2 or more")


def load_tasks(cfg) -> list:
    """The tasks the config names: a WebGym task file (--task-file), or MiniWoB++ names ("all": the --split)."""
    try:
        if cfg.task_file:
            if cfg.judge == "chat":
                from asyncwebrl.judge import JUDGES, ChatJudge

                JUDGES["chat"] = ChatJudge(cfg.judge_url, cfg.judge_model, os.environ.get("OPENAI_API_KEY", ""))
            tasks = suites.load_webgym_tasks(cfg.task_file, split=cfg.split, judge=cfg.judge,
                                             strict=cfg.task_file_strict)
        else:
            names = None if cfg.tasks == "all" else [n.strip() for n in cfg.tasks.split(",") if n.strip()]
            tasks = suites.miniwob_tasks(split=cfg.split if names is None else None, names=names)
    except (suites.TaskFileError, ValueError, OSError) as e:
        raise UsageError(str(e))
    if not tasks:
        raise UsageError(f"no tasks selected (tasks={cfg.tasks!r}, split={cfg.split!r})")
    if cfg.warmstart_steps > 0:
        from asyncwebrl.oracle import SOLVABLE

        if not any(t.id.split("/")[-1] in SOLVABLE for t in tasks):
            raise UsageError(f"--warmstart-steps: no task with a scripted solver among --tasks (solvers exist for: "
                             f"{', '.join(SOLVABLE)})")
    return [dataclasses.replace(t, max_steps=cfg.max_steps) for t in tasks] if cfg.max_steps else tasks


def model_params(model: str) -> int:
    """Parameters of a model, from its config alone (built on the meta device: nothing is loaded)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model}: cannot read its config ({str(e)[:100]})") from None
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForImageTextToText.from_config(config).parameters())
