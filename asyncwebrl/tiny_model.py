"""The tiny model: the real Qwen3-VL architecture with a tiny config and random weights, built offline (no
download, ever), with a BPE tokenizer trained on the MiniWoB++ pages and Qwen's image processor, saved with
save_pretrained so that it loads through the same from_pretrained path as Qwen3-VL-8B (02_policy.load_model).

Size (5.0M parameters): text 4 layers x 256 wide (4 query / 2 key-value heads of 64, as Qwen3's GQA), vision 2
layers x 128 wide, a 2048-token BPE. Why this size: a 2-core CPU must sample a batch of replies in well under a
second and take a gradient step in about a second, so that a run of a few minutes sees thousands of steps; and
what it must learn (match the goal's words to an element mark and copy it) is a few attention lookups deep. The
vocabulary is small on purpose: Qwen's 151k-token head would cost more than the rest of the model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from asyncwebrl import ROOT
from asyncwebrl.browser import MINIWOB_HTML

TINY_MODEL_DIR = ROOT / ".cache" / "tiny-qwen3vl"  # where `build` saves the offline CPU model
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"  # Qwen-VL's image tokens

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>"]
# Qwen's chat format: <|im_start|>role\n ... <|im_end|>\n, an image as <|vision_start|><|image_pad|><|vision_end|>
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer_corpus(system_prompt: str) -> list[str]:
    """Text the BPE learns its merges from: the MiniWoB++ pages themselves, plus the prompt's and replies' own words
    (so that the system prompt and the grammar cost few tokens)."""
    pages = sorted((MINIWOB_HTML / "miniwob").glob("*.html"))
    corpus = [p.read_text(encoding="utf-8", errors="replace") for p in pages]
    replies = [f"Memory: {m}\nAction: {a}" for m in ("", "clicked the button", "typed the text, submit next")
               for a in ("click(#3)", "click(500, 120)", 'type(#1, "hello")', 'press("Enter")', "scroll(down)",
                         "go_back()", 'answer("done")')]
    turn = "Goal: Click on the button.\nMemory: (empty)\nLast actions:\nclick(#1) -> ok\nElements:\n[0] button \"OK\""
    return corpus + [system_prompt, turn] * 50 + replies * 20


def build(system_prompt: str, path: str | Path = TINY_MODEL_DIR, seed: int = 0) -> Path:
    """Build and save the tiny model, its tokenizer and image processor under `path` (skipped if already there).
    The BPE learns its merges from the MiniWoB++ pages and the policy's own `system_prompt` and reply format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen3VLConfig, \
        Qwen3VLForConditionalGeneration

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # byte-level: any text is encodable
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_tokenizer_corpus(system_prompt), trainers.BpeTrainer(
        vocab_size=2048, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    # Qwen-VL preprocessing: 16px patches, 2x2 merged into one visual token; a 160x210 MiniWoB++ screenshot is
    # resized to 160x224 and becomes 35 visual tokens
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("image_token_id", IMAGE_PAD), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", VISION_START), ("vision_end_token_id", VISION_END))}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[12, 10, 10],
                                              mrope_interleaved=True),  # sections sum to head_dim / 2
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=256,
                           num_position_embeddings=256, deepstack_visual_indexes=[1]),
        tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    for part in (model, tokenizer, image_processor):
        part.save_pretrained(path)
    (path / "asyncwebrl-tiny").write_text("built by 02_policy.build_tiny_model: constrained decoding on by default\n")
    return path


def is_tiny(path: str) -> bool:
    return Path(path).resolve() == TINY_MODEL_DIR.resolve() or (Path(path) / "asyncwebrl-tiny").exists()
