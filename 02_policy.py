"""02 - The policy: how a vision-language model becomes a web agent.

Each step the model reads a chat prompt (the action grammar, the goal, its own memory, its last few actions and
their results, the page's element marks, the latest screenshot) and writes two lines:

    Memory: <what to keep for the next steps>
    Action: <one action of 01_env's grammar>

This file defines, in reading order:

  Prompt / Response   the system prompt, the user turn built with the model's own chat template, and a parser
                      that turns any reply (malformed, truncated) into (memory, action | error), never raising
  encode              (asyncwebrl/model_io.py) turns prompts + screenshots (+ response tokens) into model inputs;
                      the trainer and the sampler both call it, so they see the very same tokens
  Policy              the training side: per-token log-probs of response tokens (with a mask), images included
  Samplers            the rollout side: transformers `generate` here (CPU, fallback; in a process of its own
                      with asyncwebrl/engine_process.py), vLLM in asyncwebrl/vllm_engine.py (GPU); all return token
                      ids + behaviour log-probs + the policy version, and load new weights from files, atomically
                      with respect to sampling

Run `python 02_policy.py` to build the tiny model (once) and let it act on one MiniWoB++ page.

Changed from the paper, for a 2-core CPU: the default model is a 5M-parameter Qwen3-VL of the real architecture
with random weights, built offline (asyncwebrl/tiny_model.py; the paper fine-tunes Qwen3-VL-8B, which `--model`
loads through the same code), and its replies are grammar-constrained (asyncwebrl/grammar.py), so that a random
model writes valid actions from its first step; the log-probs of both sides use the same mask.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asyncwebrl import load, model_io, suites, tiny_model, weights
from asyncwebrl.grammar import ActionGrammar, GrammarLogitsProcessor
from asyncwebrl.model_io import compute_dtype, encode, quiet_libraries, screenshots  # noqa: F401 (05, 06 use some)
from asyncwebrl.tiny_model import TINY_MODEL_DIR, is_tiny

env = load("01_env")

PAPER_MODEL = "Qwen/Qwen3-VL-8B-Instruct"  # the paper's main policy (any Qwen-VL that transformers loads works)


@dataclass
class PolicyConfig:
    model: str = str(TINY_MODEL_DIR)  # local path or hub name (GPU: PAPER_MODEL); the tiny model is built if absent
    history: int = 3  # past "action -> result" lines in the prompt; older steps are forgotten (memory carries them)
    images: int = 1  # screenshots in the prompt: the latest, or the last few (the paper shows 2)
    max_new_tokens: int = 48  # reply budget; constrained decoding always fits a complete reply in it
    memory_tokens: int = 24  # constrained decoding: the memory line ends by this many tokens (leaves room to act)
    temperature: float = 1.0  # the paper samples at 1.0; log-probs for the loss use the same temperature
    constrained: bool | None = None  # grammar-constrained replies; None = on for the tiny model, off otherwise
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # compute dtype; None: bfloat16 on GPU, float32 on CPU (the trainer's weights stay fp32)
    gradient_checkpointing: bool = False  # trades compute for memory on big models; off on CPU


# ----------------------------------------------------------------------------------------------------------------
# Prompt and response

SYSTEM_PROMPT = """You are a web agent. Each turn you see the goal, your memory, your last actions, the page's \
elements as [N] marks and a screenshot. Reply with exactly two lines:
Memory: <short note of what is done and what is next>
Action: <one action>
Actions: click(#N) | click(X, Y) | type(#N, "text") | type("text") | press("Key") | scroll(up) | scroll(down) | \
go_back() | answer("text")
#N is an element mark; X, Y are 0-1000 across the screenshot."""


@dataclass(frozen=True)
class Turn:
    """What the model saw at one step: enough to re-encode it exactly, for sampling now and training later."""
    prompt: str  # the chat-templated text, with one image placeholder per screenshot
    images: tuple[str, ...]  # ScreenshotStore keys, oldest first (references, never bytes)
    n_marks: int  # element marks on the page: the grammar's range of #N


@dataclass
class AgentState:
    """What the agent carries across the steps of one episode."""
    memory: str = ""
    history: list[str] = field(default_factory=list)  # "click(#3) -> ok"
    screenshots: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Response:
    memory: str
    action: object | None  # an env.Action, or None when the reply is not valid
    action_text: str  # what the model wrote after "Action:" (or the whole reply when that is missing)
    error: str | None = None  # None | empty | no_action | truncated | syntax | unknown_action | ...


def parse_response(text: str, truncated: bool = False) -> Response:
    """(memory, action) from a reply; a malformed or truncated reply gives action=None and a reason, never raises.
    The form: optional blanks, "Memory:", the memory (any text), a line break, optional blanks, "Action:", the
    action. Read in one pass, in time linear in the reply's length (a regex with nested repeats took quadratic time
    on long replies that never reach their Action: line, on the rollout thread where every episode waits)."""
    if truncated:  # the budget ran out mid-reply: whatever parses would be an accident, so nothing is acted on
        return Response("", None, "", "truncated")
    if not text.strip():
        return Response("", None, "", "empty")
    body = text.lstrip()
    if not body.startswith("Memory:"):
        return Response("", None, text, "no_action")
    body = body[len("Memory:"):].lstrip(" \t")
    for hit in re.finditer("Action:", body):  # the first "Action:" that begins a line (after blanks) ends the memory
        start = hit.start()
        while start and body[start - 1].isspace():  # each blank is read once: runs end at the previous hit
            start -= 1
        if "\n" in body[start:hit.start()]:
            memory = body[:body.index("\n", start)].rstrip(" \t")
            action_text = body[hit.end():].lstrip(" \t").rstrip()
            try:
                return Response(memory, env.parse_action(action_text), action_text)
            except env.ActionParseError as e:
                return Response(memory, None, action_text, e.kind)
    return Response("", None, text, "no_action")


def plain(text: str) -> str:
    """Page text and the model's own memory must never turn into control tokens: "<|image_pad|>" written on a
    page (or in a reply) would otherwise be read as an image slot, "<|im_end|>" as the end of the turn."""
    return text.replace("<|", "< |")


def user_text(obs, state: AgentState, cfg: PolicyConfig) -> str:
    lines = [f"Goal: {obs.goal}", f"Memory: {state.memory or '(empty)'}"]
    if state.history:
        lines += ["Last actions:"] + state.history[-cfg.history:]
    if obs.error:
        lines.append(f"Last action failed: {obs.error}")
    lines += ["Elements:", obs.elements_text or "(none)"]
    return plain("\n".join(lines))


def messages(obs, state: AgentState, cfg: PolicyConfig) -> tuple[list[dict], tuple[str, ...]]:
    """Chat messages in the transformers multimodal format, and the screenshot keys they show."""
    shots = tuple(state.screenshots[-(cfg.images - 1):] if cfg.images > 1 else ()) + (obs.screenshot,)
    shots = tuple(s for s in shots if s is not None)[-cfg.images:]
    content = [{"type": "image"} for _ in shots] + [{"type": "text", "text": user_text(obs, state, cfg)}]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}], shots


def make_turn(tokenizer, obs, state: AgentState, cfg: PolicyConfig) -> Turn:
    msgs, shots = messages(obs, state, cfg)
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return Turn(prompt, shots, len(obs.elements))


def update_state(state: AgentState, obs, response: Response, result) -> None:
    """After a step: keep the new memory (a malformed reply keeps the old one), log the action and its result."""
    if response.action is not None:
        state.memory = response.memory
    outcome = result.obs.error or result.info.get("end") or "ok"
    state.history.append(f"{response.action_text.strip()[:60] or '(nothing)'} -> {outcome[:60]}")
    if obs.screenshot:
        state.screenshots.append(obs.screenshot)


def build_tiny_model(path: str | Path = TINY_MODEL_DIR, seed: int = 0) -> Path:
    """The offline CPU model (asyncwebrl/tiny_model.py), its tokenizer fitted to this file's prompt."""
    return tiny_model.build(SYSTEM_PROMPT, path, seed)


def load_model(cfg: PolicyConfig, trainable: bool):
    """(model, tokenizer, image_processor), tiny model or Qwen3-VL-8B (asyncwebrl/model_io.py)."""
    return model_io.load_model(cfg, trainable, build_tiny_model)


def constrained(cfg: PolicyConfig) -> bool:
    return cfg.constrained if cfg.constrained is not None else is_tiny(cfg.model)


# ----------------------------------------------------------------------------------------------------------------
# Policy: the training side


class _Prompter:
    """Policy and samplers both build turns with their model's own chat template."""

    def turn(self, obs, state: AgentState) -> Turn:
        return make_turn(self.tokenizer, obs, state, self.cfg)


class Policy(_Prompter):
    """Per-token log-probs of response tokens under the current weights, for the loss (and for pi_prox)."""

    def __init__(self, cfg: PolicyConfig, trainable: bool = True):
        self.cfg = cfg
        self.model, self.tokenizer, self.image_processor = load_model(cfg, trainable)
        self.grammar = ActionGrammar(self.tokenizer, cfg.max_new_tokens, cfg.memory_tokens) if constrained(cfg) else None
        self.tiny = is_tiny(cfg.model)  # asked now: a resumed run loads a checkpoint that is deleted later on
        self.dtype = compute_dtype(cfg, self.device)  # the weights themselves are fp32 (load_model)

    @property
    def device(self):
        return self.model.device

    def logprobs(self, turns: list[Turn], responses: list[list[int]], store) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(token | prompt, earlier tokens) of every response token: ([S, T] float32, [S, T] mask).
        Same temperature and the same grammar mask as the sampler, so the numbers are comparable."""
        batch = encode(self.tokenizer, self.image_processor, [t.prompt for t in turns],
                       [screenshots(store, t.images) for t in turns], responses, pad_left=True)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch.pop("response_mask")
        width = max(len(r) for r in responses)
        # position p predicts token p+1. Left padding ends every reply in the last column, so the LM head is needed
        # only at the last width+1 positions (a full [S, L, V] logits tensor would dwarf everything for a 151k
        # vocabulary); row i's k-th token is predicted at kept column width - len(r_i) + k. One call of the whole
        # model, so that wrappers such as FSDP2 see an ordinary forward.
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            kept = self.model(**batch, logits_to_keep=width + 1).logits.float()
        n = torch.tensor([len(r) for r in responses], device=self.device)
        cols = (width - n[:, None] + torch.arange(width, device=self.device)).clamp(max=width - 1)
        logits = kept.gather(1, cols[..., None].expand(-1, -1, kept.shape[-1])) / self.cfg.temperature
        mask = torch.zeros(len(turns), width, dtype=torch.bool, device=self.device)
        tokens = torch.full((len(turns), width), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        for i, r in enumerate(responses):
            mask[i, :len(r)] = True
            tokens[i, :len(r)] = torch.tensor(r)
        if self.grammar is not None:
            allowed = torch.ones_like(logits, dtype=torch.bool)
            for i, (turn, r) in enumerate(zip(turns, responses)):
                allowed[i, :len(r)] = self.grammar.masks(turn.n_marks, r).to(self.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
        return logp.masked_fill(~mask, 0.0), mask

    def state_dict(self) -> dict:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def save(self, folder: str | Path, state_dict: dict | None = None) -> Path:
        """A model directory that `load_model` (and from_pretrained) reads back: weights, tokenizer, image processor,
        and the tiny model's marker (so a checkpoint of it keeps constrained decoding on by default)."""
        folder = Path(folder)
        self.model.save_pretrained(folder, state_dict=state_dict)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        if self.tiny:
            (folder / "asyncwebrl-tiny").write_text("tiny model checkpoint\n")
        return folder


# ----------------------------------------------------------------------------------------------------------------
# Samplers: the rollout side. One interface: sample(turns, store) -> [Sample]; load_weights(folder, version) ->
# [digest per engine]: new weights arrive as files (asyncwebrl/weights.py), whatever the engine.


@dataclass
class Sample:
    text: str
    token_ids: list[int]  # as sampled, EOS included when the reply ended; the trainer uses these, not the text
    logprobs: list[float]  # behaviour log-prob of every sampled token (the distribution actually sampled from)
    version: int  # policy version whose weights produced this reply
    truncated: bool  # the budget ran out before EOS


class HFSampler(_Prompter):
    """transformers `generate`, batched over every step that waits for an action. Its own copy of the weights, so
    the trainer can update in parallel; a lock makes a weight load and a batch of sampling mutually exclusive."""

    def __init__(self, cfg: PolicyConfig, version: int = 0):
        from transformers import GenerationConfig

        self.cfg, self.version = cfg, version
        self.model, self.tokenizer, self.image_processor = load_model(cfg, trainable=False)
        self.grammar = ActionGrammar(self.tokenizer, cfg.max_new_tokens, cfg.memory_tokens) if constrained(cfg) else None
        self.lock = threading.Lock()
        common = dict(max_new_tokens=cfg.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                      pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True, output_scores=True)
        # explicit, so a model's own generation_config (Qwen's top_k=20, top_p=0.8, ...) cannot alter sampling:
        # the loss assumes replies come from softmax(logits / T), nothing else
        self.gen_sample = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, **common)
        self.gen_greedy = GenerationConfig(do_sample=False, **common)

    @torch.no_grad()
    def sample(self, turns: list[Turn], store, greedy: bool = False) -> list[Sample]:
        batch = encode(self.tokenizer, self.image_processor, [t.prompt for t in turns],
                       [screenshots(store, t.images) for t in turns], pad_left=True)
        batch.pop("response_mask")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        width = batch["input_ids"].shape[1]
        processors = [GrammarLogitsProcessor(self.grammar, [t.n_marks for t in turns], width)] if self.grammar else []
        with self.lock:
            version = self.version
            out = self.model.generate(**batch, generation_config=self.gen_greedy if greedy else self.gen_sample,
                                      logits_processor=processors)
        tokens = out.sequences[:, width:].cpu()
        logp = torch.stack(out.scores, 1).float().log_softmax(-1).cpu()  # scores = the processed, sampled-from logits
        logp = logp.gather(-1, tokens[..., None]).squeeze(-1)
        samples = []
        for row, lp in zip(tokens.tolist(), logp.tolist()):
            n = row.index(self.tokenizer.eos_token_id) + 1 if self.tokenizer.eos_token_id in row else len(row)
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            samples.append(Sample(text, row[:n], lp[:n], version, truncated=self.tokenizer.eos_token_id not in row))
        return samples

    @property
    def weights_dtype(self) -> torch.dtype:
        return self.model.dtype

    def load_weights(self, folder: str, version: int) -> list[str]:
        with self.lock:  # waits for the batch in flight; the next batch sees only the new weights
            digest = weights.load_into(self.model, folder)
            self.version = version
        return [digest]


def make_sampler(cfg: PolicyConfig, engine: str = "auto", engine_cfg=None):
    """engine: hf | hf-process | vllm | auto (vLLM when installed and on GPU with an unconstrained policy, else
    transformers). vLLM lives in asyncwebrl/vllm_engine.py (GPU machinery; `engine_cfg` is its EngineConfig);
    hf-process is this file's HFSampler in a process of its own (asyncwebrl/engine_process.py)."""
    if engine == "auto":
        try:
            import vllm  # noqa: F401
            engine = "vllm" if torch.cuda.is_available() and not constrained(cfg) else "hf"
        except ImportError:
            engine = "hf"
    if engine == "vllm":
        from asyncwebrl.vllm_engine import VLLMSampler

        return VLLMSampler(cfg, engine_cfg)
    if engine == "hf-process":
        from asyncwebrl.engine_process import ProcessSampler

        return ProcessSampler(cfg)
    return HFSampler(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Demo: `python 02_policy.py` builds the tiny model if absent and lets it act on one MiniWoB++ page.


async def _observe(task_name: str, seed: int):
    store = env.ScreenshotStore()
    with env.TaskServer() as server:
        browser = env.Browser()
        page = env.BrowserEnv(browser, store, server.base)
        try:
            obs = await page.reset(suites.miniwob_tasks(names=[task_name])[0], seed=seed)
        finally:
            await page.close()
            await browser.close()
    return obs, store


def main(argv=None):
    parser = argparse.ArgumentParser(description="02_policy: build the tiny offline Qwen3-VL (if absent), show it "
                                                 "one MiniWoB++ page, print the prompt, its reply and the action. "
                                                 "The model benchmark is `python -m experiments.policy_bench`.")
    parser.add_argument("--model", default=str(TINY_MODEL_DIR),
                        help=f"model path or hub name (default: the tiny model at {TINY_MODEL_DIR}; "
                             f"the paper's is {PAPER_MODEL})")
    parser.add_argument("--task", default="click-button", help="MiniWoB++ task name (default: click-button)")
    parser.add_argument("--seed", type=int, default=0, help="episode seed, also seeds sampling (default: 0)")
    parser.add_argument("--unconstrained", action="store_true",
                        help="sample without the grammar constraint (a random tiny model then writes noise)")
    args = parser.parse_args(argv)
    try:
        suites.miniwob_tasks(names=[args.task])
    except ValueError as e:
        parser.error(str(e))
    quiet_libraries()
    cfg = PolicyConfig(model=args.model, constrained=False if args.unconstrained else None)
    obs, store = asyncio.run(_observe(args.task, args.seed))
    torch.manual_seed(args.seed)
    sampler = HFSampler(cfg)
    n_params = sum(p.numel() for p in sampler.model.parameters())
    turn = make_turn(sampler.tokenizer, obs, AgentState(), cfg)
    sample = sampler.sample([turn], store)[0]
    response = parse_response(sample.text, sample.truncated)
    print(f"model: {cfg.model} ({n_params / 1e6:.1f}M parameters, constrained decoding {constrained(cfg)})")
    print(f"--- prompt ({len(sampler.tokenizer(turn.prompt)['input_ids'])} text tokens + {len(turn.images)} "
          f"screenshot) ---\n{turn.prompt}")
    print(f"--- reply ({len(sample.token_ids)} tokens, log-prob {sum(sample.logprobs):.1f}) ---\n{sample.text}")
    print(f"--- parsed ---\nmemory: {response.memory!r}\naction: {response.action} (error: {response.error})")


if __name__ == "__main__":
    main()
