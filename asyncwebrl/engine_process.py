"""The transformers engine in a process of its own: rollout and training stop sharing one Python interpreter.

vLLM's engine core runs in its own process; `--engine hf-process` does the same for 02's HFSampler, so that on a CPU
the sampler's `generate` and the trainer's backward no longer take turns holding one GIL. 04's pool talks to it as to
vLLM: one request per episode step (`asample`), the engine batching whatever waits; weights arrive as files between
two batches (asyncwebrl/weights.py) and the engine answers with the digest of what it loaded.

    parent (04's pool and trainer)                          child (this file's `_serve`)
    asample(turn) -> ("sample", id, prompt, marks, images)   take every message waiting; loads first, in order;
    load_weights(folder, v) -> ("load", folder, v)           then one `generate` over every waiting request
    a reader thread resolves futures <- ("sample", id, reply) | ("loaded", v, digest) | ("batch", t0, t1, n)

The screenshot bytes travel with the request (an engine needs the pixels; vLLM's requests carry them too); the
trainer still reads them from 01's store by key. If the child dies, every waiting request and refresh fails at once
with its exit code, never a hang.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import multiprocessing
import threading
import time
from pathlib import Path

import torch

from asyncwebrl import load
from asyncwebrl.faults import EngineDead
from asyncwebrl.model_io import load_tokenizer
from asyncwebrl.tiny_model import TINY_MODEL_DIR

REFRESH_TIMEOUT_S = 600.0  # a weight load that takes longer is a dead or stuck engine: the run stops
REPLY_TIMEOUT_S = 600.0  # likewise a reply (a CPU batch takes seconds)


class ProcessSampler:
    """04's engine interface (start, asample, load_weights, close) over a pipe to an HFSampler in a child process."""

    def __init__(self, cfg, threads: int = 1, max_batch: int = 64):
        pol = load("02_policy")
        self.pol, self.cfg, self.version, self.timeline = pol, cfg, 0, None
        if Path(cfg.model).resolve() == TINY_MODEL_DIR.resolve():
            pol.build_tiny_model(cfg.model)  # here, before the child loads it
        self.tokenizer = load_tokenizer(cfg.model)  # for the turns; the model lives in the child
        self.weights_dtype = pol.compute_dtype(cfg, cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of the trainer's threads or tensors
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, dataclasses.asdict(cfg), threads, max_batch),
                                name="engine", daemon=True)
        self.proc.start()
        child.close()
        self.ids, self.send_lock = itertools.count(), threading.Lock()
        self.waiting: dict[int, tuple] = {}  # request id -> (event loop, future)
        self.loaded: dict[int, str] = {}  # version -> digest, filled by the reader
        self.loaded_cond = threading.Condition()
        self.dead: str | None = None
        threading.Thread(target=self._read, name="engine-reader", daemon=True).start()

    def turn(self, obs, state):
        return self.pol.make_turn(self.tokenizer, obs, state, self.cfg)

    def _send(self, message) -> None:
        if self.dead:
            raise EngineDead(self.dead)
        try:
            with self.send_lock:
                self.conn.send(message)
        except OSError:  # the child is gone and the reader has not said so yet
            self.proc.join(5)
            raise EngineDead(f"the engine process died (exit code {self.proc.exitcode})") from None

    async def start(self) -> None:
        pass  # the process was started with the sampler (it loads its model meanwhile)

    async def asample(self, turn, store):
        loop, i = asyncio.get_running_loop(), next(self.ids)
        future = loop.create_future()
        shots = [store.get(k) for k in turn.images]
        self.waiting[i] = (loop, future)
        try:
            self._send(("sample", i, turn.prompt, turn.n_marks, shots))
        except EngineDead:
            self.waiting.pop(i, None)
            raise
        try:
            return await asyncio.wait_for(future, REPLY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise EngineDead(f"the engine process gave no reply in {REPLY_TIMEOUT_S:.0f} s") from None
        finally:
            self.waiting.pop(i, None)  # answered, timed out, or its episode was cancelled

    def load_weights(self, folder: str, version: int) -> list[str]:
        self._send(("load", str(folder), version))
        deadline = time.monotonic() + REFRESH_TIMEOUT_S
        with self.loaded_cond:
            while version not in self.loaded:
                if self.dead or time.monotonic() > deadline:
                    raise EngineDead(self.dead or f"the engine process did not load version {version} within "
                                       f"{REFRESH_TIMEOUT_S:.0f} s")
                self.loaded_cond.wait(0.5)
            digest = self.loaded.pop(version)
        self.version = version
        return [digest]

    def _read(self) -> None:
        try:
            while True:
                kind, *rest = self.conn.recv()
                if kind == "sample" and (entry := self.waiting.get(rest[0])):  # else its episode was cancelled
                    _settle(*entry, rest[1] if isinstance(rest[1], Exception) else self.pol.Sample(*rest[1]))
                elif kind == "loaded":
                    with self.loaded_cond:
                        self.loaded[rest[0]] = rest[1]
                        self.loaded_cond.notify_all()
                elif kind == "batch" and self.timeline is not None:
                    self.timeline.add("inference", "sample", rest[0], rest[1], n=rest[2])
        except BaseException as e:  # the pipe closed (the child died), or a bug here: either way nothing answers now
            self.proc.join(5)
            self.dead = (f"the engine process died (exit code {self.proc.exitcode})" if isinstance(e, (EOFError, OSError))
                         else f"the engine's reader failed: {type(e).__name__}: {e}")
            for loop, future in list(self.waiting.values()):
                _settle(loop, future, EngineDead(self.dead))
            with self.loaded_cond:
                self.loaded_cond.notify_all()

    def close(self) -> None:
        try:
            self._send(("stop",))
        except EngineDead:
            pass
        self.proc.join(10)
        if self.proc.is_alive():  # still generating (a loaded machine): it has nothing left to give
            self.proc.kill()
            self.proc.join(10)
        self.conn.close()


def _settle(loop, future, reply) -> None:
    """Resolve an asyncio future from the reader thread (nothing to do once its loop has closed)."""
    def settle():
        if not future.done():
            future.set_exception(reply) if isinstance(reply, Exception) else future.set_result(reply)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed: the pool has stopped
        pass


def _serve(conn, cfg: dict, threads: int, max_batch: int) -> None:
    """The child: an HFSampler; weight loads between batches, every waiting request in one batch."""
    torch.set_num_threads(threads)
    pol = load("02_policy")
    sampler = pol.HFSampler(pol.PolicyConfig(**cfg))
    while True:
        messages = [conn.recv()]
        while conn.poll() and len(messages) < 4 * max_batch:
            messages.append(conn.recv())
        if any(m[0] == "stop" for m in messages):
            return
        for _, folder, version in (m for m in messages if m[0] == "load"):
            conn.send(("loaded", version, sampler.load_weights(folder, version)[0]))
        requests = [m for m in messages if m[0] == "sample"]
        for start in range(0, len(requests), max_batch):
            _generate(conn, pol, sampler, requests[start:start + max_batch])


def _generate(conn, pol, sampler, requests: list) -> None:
    store = {f"{i}:{j}": shot for _, i, _, _, shots in requests for j, shot in enumerate(shots)}
    turns = [pol.Turn(prompt, tuple(f"{i}:{j}" for j in range(len(shots))), marks)
             for _, i, prompt, marks, shots in requests]
    t0 = time.perf_counter()
    try:
        replies = [dataclasses.astuple(s) for s in sampler.sample(turns, store)]  # a dict is a store: key -> bytes
    except Exception as e:  # a broken turn fails its own request: the batch is retried one by one
        if len(requests) > 1:
            for r in requests:
                _generate(conn, pol, sampler, [r])
            return
        replies = [RuntimeError(f"engine: {type(e).__name__}: {e}")]
    conn.send(("batch", t0, time.perf_counter(), len(requests)))
    for (_, i, *_), reply in zip(requests, replies):
        conn.send(("sample", i, reply))

