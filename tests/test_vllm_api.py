"""Every vLLM class, method, argument and command-line flag that asyncwebrl/vllm_engine.py and vllm_worker.py use
exists, with that signature, in the installed vLLM, which must be the pinned release (pyproject.toml). Runs
wherever vLLM imports, a CPU machine included (no engine is started); skipped elsewhere."""
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from asyncwebrl import ROOT, load

vllm = pytest.importorskip("vllm")
pol = load("02_policy")
from asyncwebrl import vllm_engine  # noqa: E402

CFG = pol.PolicyConfig(model="Qwen/Qwen3-VL-8B-Instruct", constrained=False, images=2)
SEVERAL_NODES = vllm_engine.EngineConfig(replicas=12, replicas_local=6, address="10.0.0.1", rpc_port=29501)


def params(f) -> list[str]:
    return list(inspect.signature(f).parameters)


def test_the_installed_vllm_is_the_pinned_release():
    pin = re.search(r'"vllm==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert vllm.__version__ == pin


@pytest.mark.parametrize("engine", [vllm_engine.EngineConfig(), SEVERAL_NODES])
def test_every_engine_argument_is_a_field_of_async_engine_args(engine):
    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    args = vllm_engine.engine_args(CFG, engine)
    assert set(args) <= fields, set(args) - fields
    AsyncEngineArgs(**args)  # and it constructs (no engine starts)


def test_the_engine_methods_the_sampler_calls():
    from vllm import SamplingParams
    from vllm.v1.engine import PauseMode
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.core_client import AsyncMPClient, DPLBAsyncMPClient

    assert params(AsyncLLM.from_engine_args)[:1] == ["engine_args"]
    assert params(AsyncLLM.generate)[:4] == ["self", "prompt", "sampling_params", "request_id"]
    assert {"mode", "clear_cache"} <= set(params(AsyncLLM.pause_generation)) and "keep" in PauseMode.__args__
    assert inspect.iscoroutinefunction(AsyncLLM.resume_generation) and callable(AsyncLLM.shutdown)
    # the refresh asks every data-parallel engine (the DP client's own call_utility_async answers for the first)
    assert params(AsyncMPClient.call_utility_all_async) == ["self", "method", "args"]
    assert issubclass(DPLBAsyncMPClient, AsyncMPClient)
    assert params(EngineCore.collective_rpc) == ["self", "method", "timeout", "args", "kwargs"]
    sp = SamplingParams(temperature=1.0, top_k=-1, top_p=1.0, logprobs=0, max_tokens=8)
    assert (sp.top_k, sp.logprobs) in ((-1, 0), (0, 0))


def test_the_worker_side_of_the_weight_refresh():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert {"weights_iterator", "is_checkpoint_format"} <= set(params(GPUModelRunner.reload_weights))
    assert "self.model_runner.reload_weights(*args, **kwargs)" in inspect.getsource(Worker.reload_weights)
    assert "self.device = torch.device(" in inspect.getsource(Worker)  # WeightLoader reads onto self.device
    assert callable(getattr(vllm_engine, "VLLMSampler"))


def test_what_the_sampler_reads_from_a_reply():
    from vllm.outputs import CompletionOutput, RequestOutput

    fields = set(params(CompletionOutput))
    assert {"text", "token_ids", "logprobs", "finish_reason"} <= fields
    assert "outputs" in params(RequestOutput)


def test_the_headless_command_of_the_other_nodes_parses(monkeypatch):
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if not current_platform.device_type:  # a machine without a GPU: vLLM's parser defaults need a device type
        monkeypatch.setattr(current_platform, "device_type", "cuda")

    command = vllm_engine.headless_command(CFG, SEVERAL_NODES, node=1)
    assert command[:2] == ["vllm", "serve"]
    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subcommand"))
    args = parser.parse_args(command[1:])
    assert args.headless and args.data_parallel_start_rank == 6 and args.data_parallel_size == 12
    assert args.worker_extension_cls == "asyncwebrl.vllm_worker.WeightLoader"
    assert args.logprobs_mode == "processed_logprobs" and args.max_model_len == 16384
    assert Path(inspect.getsourcefile(vllm)).exists()
