"""Several GPUs and nodes: where everything runs, and the trainer ranks that shard the model (used by 05_train.py).

Placement. Every node gets the same split: its first R GPUs serve rollout, the other T train (the paper's 48 + 16 is
8 nodes of 6 + 2). All rollout GPUs together are one vLLM engine with data parallelism: a replica per GPU, tensor
parallel 1; trainer rank 0 drives it (asyncwebrl/vllm_engine.py), and on the other nodes the replicas run headless.
The trainer is one rank per trainer GPU (`torchrun --nnodes N --nproc-per-node T`, or `mp.spawn` on one node),
FSDP2 over all of them, fp32 master weights with bf16 compute and fp32 gradient reduction.

Ranks. Trainer rank 0 runs everything a one-device run does (browsers, pool, loop, trainer thread); its learner
(ShardedLearner) sends each call to the other ranks first, and they run the same collective computation on their
share of the batch (`follow`). Commands and batches are Python objects and ride gloo; tensors ride NCCL (one
`cpu:gloo,cuda:nccl` group). The group's timeout covers engine start-up and the first batch (minutes for an 8B
model): a rank that dies shows up as an error on the others within it, never as a silent hang. Every thread that
touches CUDA sets its device first: the current device is per thread, and a new thread starts on cuda:0.
"""
from __future__ import annotations

import datetime
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from asyncwebrl import load, weights

loop_mod = load("04_async_loop")


class PlacementError(ValueError):
    """A layout that cannot work, said in one sentence."""


@dataclass(frozen=True)
class Placement:
    nodes: int  # machines (torchrun --nnodes); 1 for mp.spawn
    gpus: int  # GPUs per node; 0 = CPU
    rollout: int  # of them, serving rollout (one vLLM replica each); a shared single GPU counts 1
    trainer: int  # trainer ranks per node: one per trainer GPU, or CPU processes
    engine: str = "auto"

    @property
    def world(self) -> int:
        return self.nodes * self.trainer

    @property
    def replicas(self) -> int:
        return self.nodes * self.rollout

    @property
    def shared(self) -> bool:  # one GPU for both sides
        return self.gpus == 1

    def trainer_device(self, local_rank: int) -> str:
        if self.gpus == 0:
            return "cpu"
        return "cuda:0" if self.shared else f"cuda:{self.rollout + local_rank}"

    def roles(self) -> list[tuple[int, range, str]]:
        """(node, its GPUs, their role) for each group of GPUs; replicas and ranks are numbered across nodes."""
        def span(r: range) -> str:
            return f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}"
        if self.shared:
            return [(0, range(1), "rollout replica 0 + trainer rank 0 (shared)")]
        out = []
        for n in range(self.nodes):
            replicas, ranks = range(n * self.rollout, (n + 1) * self.rollout), range(n * self.trainer, (n + 1) * self.trainer)
            out.append((n, range(self.rollout), f"rollout replicas {span(replicas)}" + (" (headless)" if n else "")))
            out.append((n, range(self.rollout, self.gpus),
                        f"trainer ranks {span(ranks)}" + ("" if n else " (rank 0 drives the pool)")))
        return out

    def describe(self) -> list[str]:
        if self.gpus == 0:
            where = "in its own process" if self.engine == "hf-process" else "in the trainer's process"
            return [f"placement: CPU, rollout by transformers generate {where}; trainer: "
                    + ("one process (fp32)" if self.world == 1 else f"FSDP2 over {self.world} processes (gloo)")]
        lines = ["placement: 1 GPU, shared by the engine and the trainer" if self.shared else
                 f"placement: {self.nodes} node(s) x {self.gpus} GPUs: {self.replicas} rollout, {self.world} trainer"]
        lines += [f"  node {n}: cuda:{g[0]}{'-' + str(g[-1]) if len(g) > 1 else '':<4} {role}" for n, g, role in self.roles()]
        lines.append(f"  rollout: {self.engine} engine, {self.replicas} replica(s) (data parallel, tensor parallel 1)")
        lines.append("  trainer: " + (f"FSDP2 over {self.world} ranks" if self.world > 1 else "one rank")
                     + ", fp32 master weights, bf16 compute")
        if self.nodes > 1:
            lines.append(f"  launch : on every node, torchrun --nnodes {self.nodes} --nproc-per-node {self.trainer} "
                         f"--rdzv-backend c10d --rdzv-endpoint HEAD:29500 05_train.py ... (README)")
        return lines


def plan(gpus: int, nodes: int = 1, rollout_gpus: int = 0, trainer_procs: int = 1, engine: str = "auto") -> Placement:
    """The split of each node's GPUs: rollout_gpus (0 = 3/4 of them, as the paper's 48:16) serve, the rest train."""
    if gpus == 0:
        if nodes > 1:
            raise PlacementError("--nodes > 1 needs GPUs (a CPU run is one machine)")
        return Placement(1, 0, 0, trainer_procs, engine)
    if gpus == 1:
        if nodes > 1:
            raise PlacementError("--gpus 1 shares its GPU between the engine and the trainer: one node only")
        return Placement(1, 1, 1, 1, engine)
    rollout = rollout_gpus or min(gpus - 1, max(1, round(gpus * 0.75)))
    if not 1 <= rollout < gpus:
        raise PlacementError(f"--rollout-gpus {rollout} must leave at least one of the {gpus} GPUs to the trainer")
    return Placement(nodes, gpus, rollout, gpus - rollout, engine)


def check_launch(p: Placement, world: int, local_world: int) -> None:
    """Under torchrun: one rank per trainer GPU on every node, or NCCL finds two ranks on one GPU."""
    if local_world != p.trainer or world != p.world:
        raise PlacementError(f"torchrun started {world} rank(s), {local_world} per node; this placement needs "
                             f"{p.world}: --nnodes {p.nodes} --nproc-per-node {p.trainer} (one per trainer GPU)")


def fits_one_gpu(params: int, gpu_bytes: int, engine_fraction: float) -> bool:
    """--gpus 1: the trainer (fp32 weights, gradients and two AdamW moments: 16 bytes a parameter, plus a fifth for
    activations) must fit beside the engine's share of the GPU."""
    return 16 * params * 1.2 <= (1 - engine_fraction) * gpu_bytes


# ----------------------------------------------------------------------------------------------------------------
# Trainer ranks


def init(rank: int, world: int, port: int | None, device: str, timeout_s: float) -> None:
    """Join the trainer group (under torchrun the rendezvous is in the environment; mp.spawn passes a port)."""
    import torch.distributed as dist

    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", rank=rank, world_size=world, timeout=timeout,
                                device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)


def on_device(policy) -> None:
    """This thread's current CUDA device := the policy's (it is per thread: a new thread starts on cuda:0)."""
    if policy.device.type == "cuda":
        torch.cuda.set_device(policy.device)


def shard(model) -> None:
    """FSDP2: each transformer block is one unit (its weights gathered just for its own forward/backward), then
    the rest (embeddings, head, merger) as the root unit. On a GPU: bf16 compute, fp32 gradient reduction, and the
    optimizer steps the fp32 shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    on_gpu = next(model.parameters()).device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if on_gpu else \
        MixedPrecisionPolicy()
    for module in model.modules():
        if type(module).__name__.endswith(("DecoderLayer", "VisionBlock")):
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # the root returns its logits as a view (logits_to_keep slices them); 02's Policy only reads them out of place
    # (`.float()`, `gather`), which the warning itself says is safe: it would only interleave with the progress bar
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def full_tensors(model):
    """(name, full tensor) of the model's state, gathered one tensor at a time; every rank must iterate it."""
    for name, t in model.state_dict().items():
        yield name, t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model) -> dict:
    """All ranks take part; rank 0 receives the whole unsharded state dict (on CPU), e.g. for a checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _broadcast(message=None):
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)  # over gloo: the group has a CPU backend
    return box[0]


class ShardedLearner:
    """Rank 0's learner. Screenshots go with the batch (the other ranks have no store), once per update."""

    def __init__(self, learner):
        self.learner, self.policy, self.optimizer = learner, learner.policy, learner.optimizer

    def update(self, groups):
        on_device(self.policy)
        groups = [loop_mod.by_value(g, self.learner.store) for g in groups]
        _broadcast(("update", groups))
        return self.learner.update(groups)

    def publish(self, folder: Path, dtype: torch.dtype | None = None) -> str:
        """All ranks gather each tensor in turn; rank 0 writes the files for the engine."""
        on_device(self.policy)
        _broadcast(("publish",))
        return weights.write(full_tensors(self.policy.model), folder, dtype)

    def save(self, folder: Path) -> dict:
        """Every rank saves its optimizer shard; returns the full model state dict for rank 0 to save."""
        on_device(self.policy)
        _broadcast(("save", str(folder)))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.rank0.pt")
        return full_state_dict(self.policy.model)

    def stop(self) -> None:
        _broadcast(("stop",))


def follow(learner) -> None:
    """Ranks 1..n-1: do what rank 0 says until it says stop."""
    while True:
        command, *args = _broadcast()
        if command == "update":
            learner.update(*args)
        elif command == "publish":
            for _ in full_tensors(learner.policy.model):
                pass
        elif command == "save":
            torch.save(learner.optimizer.state_dict(), Path(args[0]) / f"optimizer.rank{learner.rank}.pt")
            full_state_dict(learner.policy.model)
        elif command == "stop":
            return


def run_rank(rank: int, world: int, local_rank: int, port: int | None, place: Placement, timeout_s: float,
             lead, follower, headless) -> None:
    """One trainer process of 05_train.py, started by torch.multiprocessing.spawn on one node or by torchrun on
    several. Rank 0 runs `lead()` (the whole pipeline); the others `follow` the learner `follower()` builds. On
    nodes 1+, local rank 0 first starts the node's headless vLLM replicas (`headless()`). A rank that finished
    leaves through exit_rank."""
    import torch.distributed as tdist

    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, place.trainer)))
    init(rank, world, port, place.trainer_device(local_rank), timeout_s)
    replicas = None
    try:
        if rank == 0:
            lead()
        else:
            if local_rank == 0 and place.nodes > 1 and place.gpus > 1:
                replicas = headless()
            follow(follower())
    finally:
        if replicas is not None:
            replicas.terminate()
        tdist.destroy_process_group()
    exit_rank()


def exit_rank() -> None:
    """A trainer rank that finished ends here, without the interpreter's finalization. Once FSDP2 has used the
    process group, torch keeps references to it past destroy_process_group (in a 10-line script too: its gloo
    threads outlive the model, the cleared DTensor caches and a gc.collect()), so a normal exit tears those threads
    down during finalization, which aborted a rank ("terminate called without an active exception") in 1 of 40
    runs here (pytorch/pytorch#190489, #179291). Everything is written and the group destroyed by now; a failed rank
    raises instead and never gets here."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()  # its own exit hook would not run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
