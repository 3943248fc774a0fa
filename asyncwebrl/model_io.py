"""Model inputs and model loading for 02's Policy and samplers.

`encode` turns prompts + screenshots (+ response tokens) into model inputs; the trainer and the sampler both call
it, so they see the very same tokens. The stock Qwen processors need torchvision, which cannot be installed beside
the CPU torch here; their job for images is small, so it is done here with the model's own tokenizer and image
processor: expand each image placeholder to the number of visual tokens the image becomes (grid t*h*w / merge^2),
and mark those tokens in mm_token_type_ids (Qwen-VL's M-RoPE needs them). `load_model` loads any Qwen-VL through
the ordinary from_pretrained path: fp32 weights for the trainer, the compute dtype for a sampler.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from asyncwebrl.tiny_model import CHAT_TEMPLATE, IMAGE_PAD, TINY_MODEL_DIR


def screenshots(store, keys) -> list:
    from PIL import Image

    return [Image.open(io.BytesIO(store.get(k))).convert("RGB") for k in keys]


def encode(tokenizer, image_processor, prompts: list[str], images: list[list], responses: list[list[int]] | None = None,
           pad_left: bool = False) -> dict:
    """Batch of model inputs. Responses (token ids, as sampled) are appended after their prompt; `response_mask`
    marks them. Left padding for generation, right padding for training."""
    flat = [img for row in images for img in row]
    vision = image_processor(images=flat, return_tensors="pt") if flat else {}
    merge = image_processor.merge_size
    n_visual = iter((vision["image_grid_thw"].prod(-1) // merge**2).tolist() if flat else [])
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    rows, resp = [], []
    for i, prompt in enumerate(prompts):
        ids = []
        for tok in tokenizer(prompt, add_special_tokens=False)["input_ids"]:
            ids += [tok] * next(n_visual) if tok == pad_id else [tok]
        r = list(responses[i]) if responses is not None else []
        rows.append(ids + r)
        resp.append([0] * len(ids) + [1] * len(r))
    width = max(map(len, rows))
    batch = {k: torch.full((len(rows), width), v, dtype=torch.long)
             for k, v in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("response_mask", 0))}
    for i, (ids, rm) in enumerate(zip(rows, resp)):
        cols = slice(width - len(ids), width) if pad_left else slice(0, len(ids))
        batch["input_ids"][i, cols] = torch.tensor(ids)
        batch["attention_mask"][i, cols] = 1
        batch["response_mask"][i, cols] = torch.tensor(rm)
    batch["mm_token_type_ids"] = (batch["input_ids"] == pad_id).long() * batch["attention_mask"]
    if flat:
        batch["pixel_values"], batch["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
    return batch


def load_model(cfg, trainable: bool, build_tiny_model):
    """(model, tokenizer, image_processor) through the ordinary from_pretrained path, tiny model or Qwen3-VL-8B
    (02's PolicyConfig; the tiny model is built with 02's prompt if absent)."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    path = cfg.model
    if Path(path).resolve() == TINY_MODEL_DIR.resolve():
        build_tiny_model(path)
    elif not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model {path!r}: no such directory, and HF_HUB_OFFLINE=1 forbids the hub")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # the trainer keeps fp32 master weights and computes in bf16 (autocast, or FSDP2's mixed precision): in bf16
    # weights most AdamW steps at lr 5e-6 round away (half an ulp of a 0.02 weight is 6e-5)
    dtype = torch.float32 if trainable else compute_dtype(cfg, device)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    tokenizer = load_tokenizer(path)
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil") if device == "cpu" else \
        AutoImageProcessor.from_pretrained(path)
    model.train(trainable)
    model.requires_grad_(trainable)
    if trainable and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer, image_processor


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:  # some Qwen-VL repos keep the template with the processor only
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def quiet_libraries() -> None:
    """For the scripts that print their own progress (05, 06): transformers' per-file loading and saving bars
    (every checkpoint would draw one) would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def compute_dtype(cfg, device: str | torch.device) -> torch.dtype:
    return getattr(torch, cfg.dtype) if cfg.dtype else torch.bfloat16 if str(device).startswith("cuda") else \
        torch.float32
