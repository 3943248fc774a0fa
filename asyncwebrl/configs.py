"""Reading and checking 05_train.py's configuration: a JSON file of fields, the types, bounds and choices of every
field (checked once, whatever set the value: default, preset, --config file or flag), and a model's size from its
config alone. Every bad input becomes one UsageError sentence; 05 prints it and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch


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
POSITIVE = ("lr", "temperature", "eps_clip", "grad_clip", "k", "dist_timeout_min", "gpu_memory_utilization")
CHOICES = dict(engine=("auto", "hf", "vllm"), split=("train", "test"), constrained=("auto", "on", "off"),
               mode=("async", "sync"), normalizer=("const", "traj"), judge=("rubric_keywords", "chat"),
               adv_std=("unbiased", "population"))


def validate(cfg) -> None:
    """Types, bounds and choices of every field: one clear sentence for the first one that is wrong."""
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
        if f.name in POSITIVE and value <= 0:
            raise UsageError(f"{flag} must be greater than 0, got {value}")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise UsageError(f"{flag} must be one of {', '.join(CHOICES[f.name])}, got {value!r}")
    if cfg.gpu_memory_utilization > 1:
        raise UsageError(f"--gpu-memory-utilization is a share of the GPU, at most 1; got {cfg.gpu_memory_utilization}")
    if cfg.eps_clip >= 1:
        raise UsageError(f"--eps-clip must be below 1 (the ratio is clipped to [1 - eps, 1 + eps]), got {cfg.eps_clip}")


def model_params(model: str) -> int:
    """Parameters of a model, from its config alone (built on the meta device: nothing is loaded)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model}: cannot read its config ({str(e)[:100]})") from None
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForImageTextToText.from_config(config).parameters())
