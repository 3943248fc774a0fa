"""The weight handoff from trainer to rollout engine: safetensors files in a folder, plus a digest to check them.

After each update the trainer writes the policy's weights into a new folder (`v<version>`, atomically: written as
`.tmp`, then renamed) and hands the engine only its path. The engine streams the files into its model between two
batches and returns the digest of what it read; the loop compares it with the digest the trainer wrote, so a refresh
that loaded nothing, or the wrong version, stops the run instead of training on replies from old weights. This is the
disk mode of AReaL and the filesystem mode of prime-rl: no tensor ever travels through an RPC argument (vLLM's
multiprocess engine would receive it as a type-less list), the same path works for the transformers engine on a
CPU and for vLLM on a GPU, and a RAM-backed folder (/dev/shm) makes it a memory copy. Across nodes, the folder must
be one that every node sees.

The digest is an integer sum of the tensors' raw bits, per tensor, mixed with the tensor's name: exact, independent
of summation order and device, and cheap on a GPU (a few reductions per update).
"""
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

SHARD_BYTES = 2 << 30  # tensors are written in files of about this size, so the host never holds the whole model
_MOD = (1 << 61) - 1
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Digest:
    """Order-free checksum of named tensors (the same value whatever the device or the order they are added in)."""

    def __init__(self):
        self.total, self.count = 0, 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        words = t.view(_WORD[t.element_size()]) if t.dtype != torch.bool else t.view(torch.uint8)
        bits = int(words.reshape(-1).sum(dtype=torch.int64)) if words.numel() else 0
        mixed = (zlib.crc32(name.encode()) + 1) * 1_000_003 + bits + 7 * t.numel()
        self.total, self.count = (self.total + mixed) % _MOD, self.count + 1

    def value(self) -> str:
        return f"{self.count}:{self.total:x}"


def default_root(parent: Path | None = None) -> Path:
    """A RAM-backed folder where there is one (Linux /dev/shm), else the temp folder. Its name holds this process's
    id: a run killed mid-refresh leaves its folder (a model's worth of RAM) behind, and the next run removes the
    folders of processes that no longer exist."""
    parent = parent or (Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir()))
    for old in parent.glob("asyncwebrl-weights-*-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"asyncwebrl-weights-{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write(tensors, folder: Path, dtype: torch.dtype | None = None) -> str:
    """Write (name, tensor) pairs as safetensors files in `folder` (replaced if present); returns their digest.
    `dtype`: cast floating tensors first (bf16 for a GPU engine). Tensors may live on any device."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    digest, shard, size, files, index = Digest(), {}, 0, 0, {}

    def flush():
        nonlocal shard, size, files
        if shard:
            name = f"model-{files:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size, files = {}, 0, files + 1

    seen = set()
    for name, t in tensors:
        t = t.detach()
        if (t.device, t.data_ptr()) in seen and t.numel():  # tied weights (embedding = head): written once
            continue
        seen.add((t.device, t.data_ptr()))
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        digest.add(name, t)
        shard[name] = t.cpu().contiguous()
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (tmp / "digest").write_text(digest.value())
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return digest.value()


def read(folder: Path, device: str | torch.device = "cpu"):
    """Yield the (name, tensor) pairs written by `write`, one file at a time."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("model-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no weights in {folder}")
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def digest_of(folder: Path) -> str:
    """The digest of the weight files in `folder`, as an engine that read them all would report it."""
    digest = Digest()
    for name, t in read(folder):
        digest.add(name, t)
    return digest.value()


def load_into(model: torch.nn.Module, folder: Path) -> str:
    """Load the folder's weights into a transformers model (every key but a tied copy must be there); returns the
    digest of what the model then holds (in the file's dtype), for the loop to compare with the trainer's."""
    state = dict(read(folder, next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    held = model.state_dict()
    loaded = {held[k].data_ptr() for k in state if k in held}
    missing = [k for k in missing if held[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise RuntimeError(f"weights in {folder} do not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    digest = Digest()
    for name, t in state.items():
        digest.add(name, held[name].to(t.dtype))
    return digest.value()
