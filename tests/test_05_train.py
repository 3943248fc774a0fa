"""05_train.py from the command line: dry-run placement, bad input, and a real tiny run killed and resumed."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncwebrl import ROOT, load, suites

train = load("05_train")
SMALL = ["--workers", "4", "--group-size", "2", "--batch-groups", "1", "--max-steps", "3", "--no-dynamic-sampling",
         "--tasks", "click-button,click-link"]


def cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, str(ROOT / "05_train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=ROOT)


@pytest.mark.parametrize("nodes,gpus,replicas,ranks", [(1, 1, 1, 1), (1, 2, 1, 1), (1, 8, 6, 2), (2, 8, 12, 4),
                                                        (8, 8, 48, 16)])  # 8 x 8: the paper's 48 + 16
def test_dry_run_maps_every_gpu_of_every_node(nodes, gpus, replicas, ranks, capsys):
    args = ["--dry-run", "--gpus", str(gpus), "--nodes", str(nodes), "--preset", "paper", "--weights-dir", "/shared/w"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    config = json.loads(out[out.index("{"):])
    assert config["gpus"] == gpus and config["nodes"] == nodes and config["group_size"] == 8
    p = train.placement(train.TrainConfig(gpus=gpus, nodes=nodes))
    assert (p.replicas, p.world) == (replicas, ranks)
    for node in range(nodes):  # every GPU of every node has exactly one role: none idles, none is used twice
        used = [g for n, gpus_, _ in p.roles() if n == node for g in gpus_]
        assert sorted(used) == list(range(gpus))
    roles = [role for _, _, role in p.roles()]
    numbered = [int(x) for role in roles for pair in re.findall(r"(?:replicas?|ranks?) (\d+)(?:-(\d+))?", role)
                for x in pair if x]
    assert max(numbered) == max(replicas, ranks) - 1  # replicas and ranks are numbered across nodes
    assert "idle" not in out and f"{replicas} replica(s)" in out
    assert (f"torchrun --nnodes {nodes} --nproc-per-node {ranks // nodes}" in out) == (nodes > 1)
    assert {p.trainer_device(k) for k in range(p.trainer)} == ({"cuda:0"} if gpus == 1 else
                                                              {f"cuda:{g}" for g in range(gpus - ranks // nodes, gpus)})


def test_a_launch_that_would_put_two_ranks_on_one_gpu_is_refused(capsys):
    place = train.placement(train.TrainConfig(gpus=8, nodes=2))
    train.dist.check_launch(place, world=4, local_world=2)
    with pytest.raises(train.dist.PlacementError, match="--nnodes 2 --nproc-per-node 2"):
        train.dist.check_launch(place, world=16, local_world=8)  # `torchrun --nproc-per-node 8`: 4 ranks a GPU
    assert train.main(["--dry-run", "--gpus", "8", "--nodes", "2"]) == 2
    assert "--weights-dir, a folder every node sees" in capsys.readouterr().err
    with pytest.raises(train.UsageError, match="--gpus 1 shares its GPU"):
        train.placement(train.TrainConfig(gpus=1, nodes=2))


def test_gpus_1_with_vllm_is_refused_in_one_line_when_the_trainer_cannot_fit(tiny_dir, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 2**30})())
    args = ["--gpus", "1", "--engine", "vllm", "--model", str(tiny_dir), "--updates", "1"]
    cfg, _ = train.resolve(args + ["--gpu-memory-utilization", "0.5"])
    train.check(cfg)  # 5M parameters: 96 MB of trainer state fit in half of 1 GiB
    cfg, _ = train.resolve(args + ["--gpu-memory-utilization", "0.95"])
    with pytest.raises(train.UsageError, match=r"--gpus 1: training 5.0M parameters .* does not fit beside the "
                                               r"engine's 95% of 1 GiB; use --gpus 2 or more"):
        train.check(cfg)


def test_one_gpu_fits_a_small_model_and_refuses_an_8b_one():
    h200 = 141 * 2**30
    assert train.dist.fits_one_gpu(2_000_000_000, h200, 0.3)  # 2B: 38 GB of trainer state beside a 42 GB engine
    assert not train.dist.fits_one_gpu(8_800_000_000, h200, 0.3)  # Qwen3-VL-8B: ~141 GB of trainer state alone
    from asyncwebrl.configs import model_params

    assert model_params(str(load("02_policy").build_tiny_model())) == sum(
        p.numel() for p in load("02_policy").Policy(load("02_policy").PolicyConfig()).model.parameters())


def test_config_precedence_defaults_preset_file_flags(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 0.5, "group_size": 3}))
    cfg, _ = train.resolve(["--preset", "paper", "--config", str(f), "--group-size", "5"])
    assert cfg.lr == 0.5 and cfg.group_size == 5 and cfg.batch_groups == 16 and cfg.workers == 128
    assert train.resolve([])[0] == train.TrainConfig(run_dir=train.resolve([])[0].run_dir)


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such directory"),
    (["--gpus", "8"], "--gpus 8: this machine has"),
    (["--tasks", "click-buton"], "unknown MiniWoB++ task(s): ['click-buton']"),
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--mode", "fast"], "--mode must be one of async, sync"),
    (["--updates", "0"], "0 only with --warmstart-steps"),
    (["--warmstart-steps", "5", "--updates", "0", "--tasks", "click-color,click-shape"], "no task with a scripted"),
    (["--judge", "chat"], "--judge chat needs --judge-url and --judge-model"),
    (["--judge", "gpt"], "--judge must be one of rubric_keywords, chat"),
    (["--grad-clip", "-1"], "--grad-clip must be greater than 0"),  # would flip the gradient
    (["--max-staleness", "-1"], "--max-staleness must be at least 0"),  # would admit nothing and hang
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),  # would keep every checkpoint
    (["--max-steps", "-1"], "--max-steps must be at least 0"),  # would end every episode after one step
    (["--lr", "-1"], "--lr must be greater than 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--eps-clip", "1.5"], "--eps-clip must be below 1"),
    (["--adv-std", "sample"], "--adv-std must be one of unbiased, population"),
    (["--model", "tests"], "--model tests: not a model directory"),
])
def test_bad_input_gives_one_clear_message_and_nonzero_exit(args, message, capsys):
    with pytest.raises(SystemExit) if args == ["--bogus"] else _no_raise():
        rc = train.main(args)
        assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("content, message", [
    ('{"lr": "fast"}', "--lr must be a number, got 'fast'"),
    ('{"workers": 2.5}', "--workers must be int, got 2.5"),
    ('{"dynamic_sampling": "yes"}', "--dynamic-sampling must be bool"),
    ('{"group_size": true}', "--group-size must be int, got True"),
    ('{"grad_clip": -1}', "--grad-clip must be greater than 0"),
    ('[1, 2]', "expected a JSON object of config fields, got list"),
    ('{"lr": ', "cannot read it (JSONDecodeError"),
    ('{"no_such_field": 1}', "unknown config field(s): ['no_such_field']"),
])
def test_a_config_file_is_validated_like_the_flags(tmp_path, capsys, content, message):
    f = tmp_path / "c.json"
    f.write_text(content)
    assert train.main(["--dry-run", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


FIELD_VALUES = st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats() | st.text(max_size=8) | \
    st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(train.TrainConfig)] + ["bogus"]),
                       FIELD_VALUES, max_size=4))
def test_any_config_file_is_accepted_or_refused_in_one_line(tmp_path_factory, fields):
    """Adversarial --config files (any field, any JSON value): a dry run validates them or says why in one line."""
    import contextlib
    import io

    f = tmp_path_factory.mktemp("cfg") / "c.json"
    f.write_text(json.dumps(fields))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = train.main(["--dry-run", "--config", str(f)])
    assert rc in (0, 2), err.getvalue()
    if rc == 0:
        train.validate(train.TrainConfig(**json.loads(out.getvalue()[out.getvalue().index("{"):])))
    else:
        assert err.getvalue().startswith("05_train.py: error: ") and err.getvalue().count("\n") == 1


@pytest.mark.parametrize("content", ["", "{", "[]", '{"config": 3}', '{"commit": "x"}', "\x00\xff"])
def test_resume_of_a_run_whose_config_json_is_broken_is_one_line(tmp_path, capsys, content):
    (tmp_path / "config.json").write_text(content, errors="surrogateescape")
    assert train.main(["--resume", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"05_train.py: error: --resume {tmp_path / 'config.json'}") and err.count("\n") == 1


FLAGS = [f for f in dataclasses.fields(train.TrainConfig) if f.name not in ("run_dir", "model", "task_file")]
VALUES = st.sampled_from(["0", "1", "-1", "2", "1e-4", "nan", "inf", "-0.5", "3.7", "abc", "", "click-button",
                          "async", "const", "all", "on", "unbiased", "9" * 30, "--x"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FLAGS), VALUES), max_size=4))
def test_any_command_line_is_accepted_or_refused_in_one_line(flags):
    """Adversarial command lines (every field, odd values): a dry run either prints a config that passes
    validation or exits with status 2 and one line, never a traceback."""
    import contextlib
    import io

    argv = ["--dry-run"]
    for f, value in flags:
        flag = "--" + f.name.replace("_", "-")
        argv += [flag if value in ("0", "1") else "--no-" + flag[2:]] if f.type == "bool" else [flag, value]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = train.main(argv)
        except SystemExit as e:  # argparse's own refusal (a value of the wrong type): usage + one error line
            rc = e.code
    assert rc in (0, 2), (argv, err.getvalue())
    if rc == 0:
        cfg = train.TrainConfig(**json.loads(out.getvalue()[out.getvalue().index("{"):]))
        train.validate(cfg, dry_run=True)  # a dry run plans for GPUs this machine may not have
    else:
        assert "Traceback" not in err.getvalue() and err.getvalue().strip().splitlines()[-1].count("error") == 1


def test_rewind_drops_what_came_after_the_checkpoint_and_keeps_the_clock(tmp_path):
    """A resume reads back metrics.jsonl, trajectories/ and timeline.jsonl: what the killed run did after its last
    checkpoint goes (it is redone), and the resumed clock counts on from the killed run's last record."""
    run = train.Run(train.TrainConfig(run_dir=str(tmp_path)))
    rows = [json.dumps(dict(version=v, time_s=10.0 * v)) for v in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"version": 6, "ti')  # a row cut by the kill
    (tmp_path / "timeline.jsonl").write_text(json.dumps(dict(component="trainer", kind="train", start=50, end=63.5)))
    for v in range(1, 7):
        (tmp_path / "trajectories" / f"v{v:04d}" / "traj1").mkdir(parents=True)
    assert run.rewind(3) == 63.5
    assert [json.loads(line)["version"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "trajectories").iterdir()) == ["v0001", "v0002", "v0003"]
    assert run.rewind(3) == 63.5 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert train.Run(train.TrainConfig(run_dir=str(tmp_path / "new"))).rewind(0) == 0.0  # a new run: nothing


def test_tiny_learn_preset_warm_starts_with_a_tight_horizon():
    cfg, _ = train.resolve(["--preset", "tiny-learn"])
    assert cfg.warmstart_steps > 0 and cfg.max_steps == cfg.k == 4 and "enter-text" not in cfg.tasks
    assert all(t.max_steps == 4 and t.split == "train" for t in train.load_tasks(cfg))


def test_bad_task_file_names_the_file_and_line(tmp_path):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"task_name": "find it", "website": "https://example.org", "evaluator_reference": []}\n')
    r = cli("--task-file", str(bad), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and f"{bad}:1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing started


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rows(run):
    """Complete metrics rows (a row being written at the moment of the kill is not one)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # text after the last newline: partial
    return [json.loads(line) for line in lines]


@pytest.mark.browser
@pytest.mark.slow
def test_compare_sync_writes_the_benchmark_json_and_figure(tmp_path):
    from experiments import compare_sync as bench

    cfg, _ = train.resolve(["--updates", "2", *SMALL, "--max-steps", "2", "--workers", "2"])
    summary = bench.compare_sync(cfg, out=tmp_path)
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert (tmp_path / "throughput.png").stat().st_size > 10_000
    assert [r["name"] for r in saved["ablation"]] == [name for name, _ in bench.VARIANTS]
    by = {r["name"]: r for r in saved["ablation"]}
    assert saved["speedup_async_over_sync"] == pytest.approx(
        by["async (full)"]["samples_per_s"] / by["sync"]["samples_per_s"], rel=1e-2)
    slower = min(saved["rollout_only_samples_per_s"], saved["train_only_samples_per_s"])
    assert saved["overlap_efficiency"] == pytest.approx(by["async (full)"]["samples_per_s"] / slower, rel=1e-2)
    assert all(r["trajectories"] == 2 * 2 for r in saved["ablation"])  # same trained work in every variant
    assert set(saved["timelines"]) == {"sync", "async (full)"} and summary["commit"]
    assert saved["config"]["dynamic_sampling"] is False and by["sync"]["vs_sync"] == 1.0  # the pipeline, not luck

    def overlap(spans):  # seconds in which a browser worker stepped while the trainer trained
        train = [(x["start"], x["end"]) for x in spans if x["component"] == "trainer" and x["kind"] == "train"]
        steps = [(x["start"], x["end"]) for x in spans if x["component"].startswith("env/")]
        return sum(max(0.0, min(b, d) - max(a, c)) for a, b in train for c, d in steps)

    # what async buys, whatever the speeds on this machine: rollout goes on during training; sync never does
    assert overlap(saved["timelines"]["sync"]) < 0.01 < overlap(saved["timelines"]["async (full)"])


@pytest.mark.slow
def test_sharded_update_over_two_gloo_processes_equals_the_single_process_update(tiny_dir, tmp_path):
    """The FSDP2 path of --gpus N, on CPU: same batch, same start, plain SGD; the gathered weights must match."""
    import torch

    results = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}.pt"
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_update.py"), str(tiny_dir), str(out),
                            str(world)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})  # this tree's code
        assert r.returncode == 0, r.stderr[-3000:]
        results[world] = torch.load(out, weights_only=False)
    one, two = results[1]["state"], results[2]["state"]
    start = load("02_policy").Policy(load("02_policy").PolicyConfig(model=str(tiny_dir))).state_dict()
    assert set(one) == set(two)
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # the update did something
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    one_m, two_m = results[1]["metrics"], results[2]["metrics"]  # every metric, gathered over the ranks
    assert set(one_m) == set(two_m) and one_m["iw_max"] > 1 and one_m["tokens"] > 0
    for key in one_m:
        assert two_m[key] == pytest.approx(one_m[key], rel=1e-5, abs=1e-6), key
    for world in (1, 2):  # the weight files for the engine hold exactly the gathered weights
        assert results[world]["digest"] == results[world]["digest_of_state"]


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_training_with_the_trainer_sharded_over_two_processes(tmp_path, launcher):
    """--trainer-procs 2 (the script spawns its ranks) and torchrun (the multi-node launcher, here one node). No
    process reaches the interpreter's exit with the trainer group's gloo threads alive: torn down there, they
    aborted a rank in about 1 run in 40 (asyncwebrl.distributed.exit_rank). Every process reports its threads from an exit hook."""
    run = tmp_path / "run"
    args = ["--run-dir", str(run), "--updates", "2", "--checkpoint-every", "2", *SMALL]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "def report():\n"
        "    names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        f"    open({str(tmp_path)!r} + f'/exit-{{os.getpid()}}', 'w').write(' '.join(names))\n"
        "atexit.register(report)\n")
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    if launcher == "spawn":
        r = cli(*args, "--trainer-procs", "2", env=env)
    else:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(ROOT / "05_train.py"), *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    exits = [f.read_text() for f in tmp_path.glob("exit-*")]
    assert exits and not any("gloo" in names for names in exits), exits  # the launcher's exits: no gloo thread
    assert "FSDP2 over 2 processes (gloo)" in r.stdout
    assert [row["version"] for row in _rows(run)] == [1, 2]
    ckpt = run / "checkpoints" / "v0002"
    assert (ckpt / "optimizer.rank0.pt").is_file() and (ckpt / "optimizer.rank1.pt").is_file()
    assert (ckpt / "model" / "model.safetensors").is_file()


def test_optional_loggers_that_are_not_installed_are_a_clear_error(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    assert train.main(["--tensorboard", "--run-dir", str(tmp_path / "r"), "--updates", "1", *SMALL]) == 2
    assert "--tensorboard needs `pip install tensorboard`" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything started


def test_judge_chat_registers_the_llm_judge_for_webgym_tasks(tmp_path, monkeypatch):
    from asyncwebrl.judge import ChatJudge

    f = tmp_path / "tasks.jsonl"
    f.write_text('{"task_name": "find it", "website": "example.org", "evaluator_reference": [{"facts": ["a"]}]}\n')
    monkeypatch.setitem(train.env.JUDGES, "chat", None)  # restored after the test
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    cfg, _ = train.resolve(["--task-file", str(f), "--judge", "chat", "--judge-url", "http://h/v1", "--judge-model", "m"])
    tasks = train.load_tasks(cfg)
    judge = train.env.JUDGES["chat"]
    assert [t.judge for t in tasks] == ["chat"] and isinstance(judge, ChatJudge)
    assert (judge.url, judge.model, judge.api_key) == ("http://h/v1/chat/completions", "m", "secret")
    assert "secret" not in json.dumps(dataclasses.asdict(cfg))  # the key never lands in the saved config


def test_a_checkpoint_restores_the_whole_training_state(tiny_dir, tmp_path):
    """Save, go on training (weights, Adam moments, every RNG and the task order move on), restore: everything is
    as it was at the save. A restart at the saved version number alone would differ in each of these."""
    import random
    import types

    import torch

    pol, aloop = load("02_policy"), load("04_async_loop")
    tasks = suites.miniwob_tasks(names=["click-button", "click-link", "click-tab", "focus-text"])
    run = train.Run(train.TrainConfig(run_dir=str(tmp_path)))

    def step(learner):  # one optimizer step on a loss that touches every weight
        loss = sum((p.float() ** 2).sum() for p in learner.policy.model.parameters())
        loss.backward()
        learner.optimizer.step()
        learner.optimizer.zero_grad()

    torch.manual_seed(0)
    policy = pol.Policy(pol.PolicyConfig(model=str(tiny_dir)))
    learner = aloop.Learner(policy, None)
    pool = types.SimpleNamespace(rng=random.Random(7), order=list(tasks))
    step(learner)
    pool.rng.random(), pool.order.pop(), random.random(), torch.rand(3)
    run.save_checkpoint(policy, learner, pool, 3)
    saved = dict(weights={k: v.clone() for k, v in policy.state_dict().items()},
                 adam=[s["exp_avg_sq"].clone() for s in learner.optimizer.state.values()],
                 torch_rng=torch.get_rng_state(), python_rng=random.getstate(), task_rng=pool.rng.getstate(),
                 order=[t.id for t in pool.order])
    step(learner)  # the run goes on, then dies
    pool.rng.random(), pool.order.pop(), random.random(), torch.rand(3)

    ckpt = run.latest_checkpoint()
    fresh = pol.Policy(pol.PolicyConfig(model=str(ckpt / "model")))
    fresh_learner = aloop.Learner(fresh, None)
    fresh_pool = types.SimpleNamespace(rng=random.Random(0), order=[])
    assert run.restore(ckpt, fresh_learner, fresh_pool, tasks) == 3
    assert all(torch.equal(v, saved["weights"][k]) for k, v in fresh.state_dict().items())
    adam = [s["exp_avg_sq"] for s in fresh_learner.optimizer.state.values()]
    assert len(adam) == len(saved["adam"]) and all(torch.equal(a, b) for a, b in zip(adam, saved["adam"]))
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"]) and random.getstate() == saved["python_rng"]
    assert fresh_pool.rng.getstate() == saved["task_rng"] and [t.id for t in fresh_pool.order] == saved["order"]
    assert ckpt.name == "v0003" and not list(tmp_path.glob("checkpoints/*.tmp"))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FLAGS), VALUES), max_size=3), st.sampled_from([[], ["--repeats", "2"],
       ["--repeats", "0"], ["--repeats", "x"], ["--repeats"]]))
def test_the_throughput_benchmark_command_line_runs_or_is_refused_in_one_line(flags, repeats):
    """`python -m experiments.compare_sync` takes 05's flags and --repeats: any such command line either reaches the
    benchmark with a config that passes validation and a repeat count of at least 1, or exits with status 2 and one
    error line (the benchmark itself is stubbed: it would run minutes)."""
    import contextlib
    import io

    from experiments import compare_sync

    ran, real = [], compare_sync.compare_sync
    compare_sync.compare_sync = lambda cfg, repeats: ran.append((cfg, repeats))
    argv = list(repeats)
    for f, value in flags:
        flag = "--" + f.name.replace("_", "-")
        argv += [flag if value in ("0", "1") else "--no-" + flag[2:]] if f.type == "bool" else [flag, value]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = compare_sync.main(argv)
        except SystemExit as e:
            rc = e.code
        finally:
            compare_sync.compare_sync = real
    assert rc in (0, 2), (argv, err.getvalue())
    if rc == 0:
        (cfg, n), = ran
        train.validate(cfg)
        assert n >= 1
    else:
        said = err.getvalue()
        assert not ran and "Traceback" not in said and said.strip().splitlines()[-1].count("error") == 1
