"""vLLM worker extension (GPU only): loads new policy weights into a running engine, in place.

vLLM imports this class into each of its worker processes (`LLM(worker_extension_cls=...)`), and
`llm.collective_rpc("load_named_weights", args=(weights,))` calls the method below on every worker. The model's own
`load_weights` knows how to split checkpoint names into vLLM's fused layers (qkv, gate_up), so the trainer can send
its plain transformers state dict. This is the simple path (weights pickled through the RPC); the paper broadcasts
over NCCL, which matters at 8B parameters and is left to 05_train.py's multi-GPU placement.
"""


class WeightUpdater:
    def load_named_weights(self, weights: list) -> int:
        loaded = self.model_runner.model.load_weights(weights=weights)
        return len(loaded) if loaded is not None else len(weights)
