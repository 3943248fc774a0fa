"""vLLM worker extension (GPU only): loads a refresh's weight files into a running engine, in place.

vLLM mixes this class into each of its worker processes (`worker_extension_cls`), and the rollout engine
(asyncwebrl/vllm_engine.py) calls `load_weights_file(folder)` on every worker through `collective_rpc`: only the path
crosses vLLM's RPC, never a tensor (in the default multiprocess engine tensors in RPC arguments arrive as type-less
lists). The worker streams the safetensors files onto its GPU and hands them to vLLM's own in-place reload
(`Worker.reload_weights`, vLLM 0.33.0), which maps transformers names onto vLLM's fused layers (qkv, gate_up) and
resets the encoder and multimodal caches. It returns the digest of what it read, for the loop to compare with the
digest the trainer wrote (asyncwebrl/weights.py).
"""
from asyncwebrl import weights


class WeightLoader:
    def load_weights_file(self, folder: str) -> str:
        digest = weights.Digest()

        def tensors():
            for name, t in weights.read(folder, self.device):
                digest.add(name, t)
                yield name, t

        self.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
        return digest.value()
