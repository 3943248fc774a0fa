"""The paper's figures at our scale, from run logs alone (`python 06_eval.py --figures RUN_DIR ...`).

Every figure is a PNG in figures/ with a JSON beside it holding exactly the numbers drawn: the raw per-update
series of every run, and the curve of each variant (median over its runs, min-max band). Curves are smoothed with
a moving average over SMOOTH updates (said on the axis); the JSON keeps the raw numbers too.

A directory given here is either a training run (config.json + metrics.jsonl from 05_train.py, plus any eval-*.json
tables that 06_eval.py saved inside it) or a throughput benchmark folder (throughput.json from
`python -m experiments.compare_sync`).
"""
from __future__ import annotations

import json
from pathlib import Path

from asyncwebrl import ROOT

SMOOTH = 5
SLICES = ("easy", "medium", "hard", "all")


class RunLogError(ValueError):
    """A run log that is missing or cannot be read; the message names the file."""


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunLogError(f"{path}: truncated or not JSON ({type(e).__name__})") from None


def _number(value) -> float:
    """A metric as it is logged; anything that is not a number (missing, null, a string) is NaN: a gap in a curve."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def _json_lines(path: Path) -> list[dict]:
    """metrics.jsonl rows; each must be an object with an integer version (05_train.py writes nothing else)."""
    if not path.is_file():
        raise RunLogError(f"{path}: missing (is this a 05_train.py run directory?)")
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                raise RunLogError(f"{path} line {n}: truncated or not JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("version"), int) or isinstance(row["version"], bool):
                raise RunLogError(f"{path} line {n}: not a metrics row (an object with an integer version)")
            rows.append(row)
    if not rows:
        raise RunLogError(f"{path}: no rows (the run has not finished an update)")
    return rows


def _config(path: Path) -> tuple[dict, str]:
    saved = _json(path)
    cfg = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(cfg, dict) or cfg.get("normalizer") not in ("const", "traj") or \
            cfg.get("mode", "async") not in ("async", "sync") or not isinstance(cfg.get("decoupled", True), bool):
        raise RunLogError(f"{path}: not a 05_train.py config")
    return cfg, str(saved.get("commit", "?"))


def _eval_table(path: Path) -> dict:
    t = _json(path)
    if not (isinstance(t, dict) and isinstance(t.get("slices"), dict) and isinstance(t.get("split"), str) and
            all(isinstance(v, dict) and isinstance(v.get("episodes", 0), int) and
                (not v.get("episodes") or (isinstance(v.get("success"), (int, float)) and
                                           isinstance(v.get("ci95"), list) and len(v["ci95"]) == 2))
                for v in t["slices"].values())):
        raise RunLogError(f"{path}: not a 06_eval.py result table")
    return t


def read_run(folder: Path) -> dict:
    folder = Path(folder)
    if (folder / "throughput.json").is_file() and not (folder / "metrics.jsonl").exists():
        return dict(kind="throughput", name=folder.name, dir=folder, throughput=_json(folder / "throughput.json"))
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise RunLogError(f"{cfg_file}: missing (is this a 05_train.py run directory?)")
    cfg, commit = _config(cfg_file)
    evals = {str(p.relative_to(folder)): _eval_table(p) for p in sorted(folder.rglob("eval-*.json"))}
    if cfg.get("updates") == 0 and not (folder / "metrics.jsonl").exists():  # a warm start alone: tables only
        return dict(kind="evals", name=folder.name, dir=folder, config=cfg, commit=commit, evals=evals)
    return dict(kind="train", name=folder.name, dir=folder, config=cfg, commit=commit,
                metrics=_continued_clock(_json_lines(folder / "metrics.jsonl")), evals=evals)


def _continued_clock(rows: list[dict]) -> list[dict]:
    """A resumed run's loop starts its clock (time_s) at 0 again: count on from the row before."""
    offset, last = 0.0, 0.0
    for row in rows:
        if isinstance(row.get("time_s"), (int, float)) and not isinstance(row["time_s"], bool):
            if row["time_s"] + offset < last:
                offset = last
            row["time_s"] = last = row["time_s"] + offset
    return rows


def normalizer_label(run: dict) -> str:
    """1/k or 1/|tau_i|; a sync run is its own curve (a sync baseline must not blend into the async median)."""
    name = "1/k" if run["config"]["normalizer"] == "const" else "1/|tau_i|"
    return name if run["config"].get("mode", "async") == "async" else f"{name}, {run['config']['mode']}"


def mode_label(run: dict) -> str:
    return f"{run['config']['mode']}, {'1/k' if run['config']['normalizer'] == 'const' else '1/|tau_i|'}"


def _smooth(ys: list[float]) -> list[float]:
    out = []
    for i in range(len(ys)):
        window = [y for y in ys[max(0, i - SMOOTH + 1):i + 1] if y == y]  # nan: no trajectory of that kind
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def _series(runs: list[dict], key: str, group, x: str = "version") -> dict:
    """{group: {x, median, lo, hi}} over the runs of each group, and the raw series of every run."""
    raw = {r["name"]: dict(group=group(r), x=[_number(m.get(x)) for m in r["metrics"]],
                           y=[_number(m.get(key)) for m in r["metrics"]]) for r in runs}
    curves = {}
    for g in sorted({v["group"] for v in raw.values()}):
        members = [v for v in raw.values() if v["group"] == g]
        n = min(len(v["x"]) for v in members)  # the versions every run of the group reached
        smooth = [_smooth(v["y"])[:n] for v in members]
        cols = [sorted(y for y in col if y == y) for col in zip(*smooth)]
        curves[g] = dict(runs=len(members), x=[_mean_x(members, i) for i in range(n)],
                         median=[c[len(c) // 2] if len(c) % 2 else (sum(c[len(c) // 2 - 1:len(c) // 2 + 1]) / 2
                                                                   if c else float("nan")) for c in cols],
                         lo=[c[0] if c else float("nan") for c in cols], hi=[c[-1] if c else float("nan") for c in cols])
    return dict(key=key, curves=curves, runs=raw)


def _mean_x(members: list[dict], i: int) -> float:
    return sum(v["x"][i] for v in members) / len(members)


def _plot(ax, data: dict, style: str = "-", label_suffix: str = "") -> None:
    for g, c in data["curves"].items():
        line, = ax.plot(c["x"], c["median"], style, label=f"{g}{label_suffix} (median of {c['runs']})")
        if c["runs"] > 1:
            ax.fill_between(c["x"], c["lo"], c["hi"], color=line.get_color(), alpha=0.15)


def _footer(fig, runs: list[dict]) -> None:
    names = ", ".join(r["name"] for r in runs)
    commits = ", ".join(sorted({r.get("commit", "?") for r in runs}))
    fig.text(0.01, 0.005, f"runs: {names[:160]}{'...' if len(names) > 160 else ''}  |  commit {commits}",
             fontsize=6, color="grey")


def _save(fig, out: Path, stem: str, payload: dict) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, 0.03, 1, 1))
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {png} (+ .json)")
    return png


def _curve_figure(runs, out, stem, title, panels, ylabel, group=normalizer_label, x="version",
                  xlabel="policy version (updates)") -> Path:
    """One panel per (metric key, panel title); one curve per group of runs."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    payload = dict(figure=title, smooth=SMOOTH, commits=sorted({r["commit"] for r in runs}), panels={})
    for ax, (key, panel) in zip(axes[0], panels):
        data = _series(runs, key, group, x)
        _plot(ax, data)
        ax.set(xlabel=xlabel, ylabel=f"{ylabel} (moving avg. {SMOOTH})", title=panel)
        ax.legend(fontsize=8)
        payload["panels"][key] = data
    fig.suptitle(title, fontsize=11)
    _footer(fig, runs)
    return _save(fig, out, stem, payload)


def fig_clip(runs, out) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    payload = dict(figure="clip-trigger rate", smooth=SMOOTH, commits=sorted({r["commit"] for r in runs}), panels={})
    for key, style, name in (("clip_frac_decoupled", "-", ": ratio to pi_prox (decoupled)"),
                             ("clip_frac_coupled", "--", ": ratio to pi_behave (coupled)")):
        data = _series(runs, key, lambda r: "decoupled run" if r["config"]["decoupled"] else "coupled run")
        _plot(ax, data, style, name)
        payload["panels"][key] = data
    ax.set(xlabel="policy version (updates)", ylabel=f"fraction of reply tokens clipped (moving avg. {SMOOTH})",
           title="Clip-trigger rate: both ratios measured on the same batches")
    ax.legend(fontsize=7)
    _footer(fig, runs)
    return _save(fig, out, "fig5_clip_rate", payload)


def _eval_label(t: dict) -> str:
    where = "test split (OOD)" if t["split"] == "test" else "train tasks, held-out episodes"
    return f"{where}, {'greedy' if t['mode'] == 'greedy' else t['mode']}"


def fig_slices(runs, out) -> Path | None:
    """Final success by difficulty slice: one panel per kind of evaluation, one bar per variant (warm start,
    1/k async, ...) and slice. Bar = median over the variant's seeds; whisker = min-max over seeds, or the 95%
    Wilson interval when the variant has one run."""
    import statistics

    import matplotlib.pyplot as plt

    tables = [(r, rel, t) for r in runs for rel, t in r["evals"].items()]
    if not tables:
        print("fig7: no eval-*.json in these runs (run 06_eval.py on them first); skipped")
        return None
    def variant(r):  # "1/k, async"
        return "warm start" if r["kind"] == "evals" else ", ".join(mode_label(r).split(", ")[::-1])

    kinds = sorted({_eval_label(t) for _, _, t in tables}, key=lambda k: ("OOD" in k, k))
    variants = list(dict.fromkeys(variant(r) for r, _, _ in sorted(tables, key=lambda x: x[0]["kind"] == "train")))
    payload = dict(figure="success by difficulty slice", tables={f"{r['name']}/{rel}": {s: t["slices"].get(s)
                   for s in SLICES} for r, rel, t in tables}, bars={})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.2), squeeze=False, sharey=True)
    width = 0.8 / len(variants)
    for ax, kind in zip(axes[0], kinds):
        for i, v in enumerate(variants):
            members = [t for r, _, t in tables if variant(r) == v and _eval_label(t) == kind]
            if not members:
                continue
            ys, lo, hi = [], [], []
            for sl in SLICES:
                rows = [t["slices"][sl] for t in members if t["slices"].get(sl, {}).get("episodes")]
                y = statistics.median(row["success"] for row in rows) if rows else float("nan")
                seeds = [row["success"] for row in rows]
                low, high = (rows[0]["ci95"] if len(rows) == 1 else (min(seeds), max(seeds)) if rows else (y, y))
                ys.append(y), lo.append(max(0.0, y - low)), hi.append(max(0.0, high - y))  # Wilson bound 1 - 1e-16
            ax.bar([j + i * width for j in range(len(SLICES))], ys, width, yerr=[lo, hi], capsize=3, color=f"C{i}",
                   label=f"{v} ({len(members)} run{'s' if len(members) > 1 else ''})")
            payload["bars"][f"{kind} | {v}"] = dict(runs=len(members), slices=dict(zip(SLICES, ys)))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SLICES))], SLICES)
        ax.set(title=kind, ylim=(0, 1.05), xlabel="difficulty slice")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("success rate (median over seeds)")
    fig.suptitle("Success by difficulty slice (whiskers: min-max over seeds; one run: 95% Wilson CI)", fontsize=11)
    _footer(fig, runs)
    return _save(fig, out, "fig7_success_by_slice", payload)


def make_figures(dirs: list[Path], out: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out or ROOT / "figures")
    out.mkdir(parents=True, exist_ok=True)
    loaded = [read_run(d) for d in dirs]
    runs = [r for r in loaded if r["kind"] == "train"]
    made = []
    for bench in (r for r in loaded if r["kind"] == "throughput"):
        sim = next((f for f in (bench["dir"] / "paper_scale.json", ROOT / "figures" / "paper_scale.json")
                    if f.is_file()), None)
        simulated = _json(sim) if sim else None  # the paper-scale study (experiments/paper_scale.py), if run
        if simulated is not None and not (isinstance(simulated, dict) and isinstance(simulated.get("variants"), dict)):
            raise RunLogError(f"{sim}: not a paper_scale result")
        try:
            fig1_figure(bench["throughput"], simulated, out / "fig1_throughput.png")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # written by hand, or by another version
            raise RunLogError(f"{bench['dir'] / 'throughput.json'} or {sim}: not a compare_sync / paper_scale "
                              "result") from None
        (out / "fig1_throughput.json").write_text(json.dumps(dict(measured=bench["throughput"], simulated=simulated),
                                                             indent=1) + "\n")
        made.append(out / "fig1_throughput.png")
    if not runs:
        return made
    # every finished rollout when the runs logged it (rollout_*), else the trained batch (biased towards mixed groups)
    pick = lambda key: f"rollout_{key}" if all(f"rollout_{key}" in r["metrics"][0] for r in runs) else key  # noqa: E731
    success = pick("success")
    made.append(_curve_figure(runs, out, "fig2_success", "Success rate over training: 1/k vs 1/|tau_i|",
                              [(success, "every finished rollout")], "success rate"))
    made.append(_curve_figure(runs, out, "fig3_steps", "Steps per trajectory over training: 1/k vs 1/|tau_i|",
                              [(pick("steps_success"), "steps, successful trajectories"),
                               (pick("steps_failure"), "steps, failed trajectories")], "steps per trajectory"))
    made.append(_curve_figure(runs, out, "fig4_tokens", "Reply tokens per step (memory verbosity): 1/k vs 1/|tau_i|",
                              [(pick("tokens_per_step"), "every finished rollout")], "reply tokens per step"))
    made.append(fig_clip(runs, out))
    made.append(_curve_figure(runs, out, "fig6_token_weight",
                              "Per-token gradient weight in the loss (03_grpo_loss.py), measured on each batch",
                              [("token_weight_success", "weight per token, successful trajectories"),
                               ("token_weight_failure", "|weight| per token, failed trajectories")],
                              "gradient weight per token"))
    made.append(fig_slices([r for r in loaded if r["kind"] in ("train", "evals")], out))
    made.append(_curve_figure(runs, out, "fig8_success_wallclock", "Success against wall-clock: async vs sync",
                              [(success, "every finished rollout")], "success rate", group=mode_label, x="time_s",
                              xlabel="wall-clock seconds since the loop started"))
    return [m for m in made if m is not None]


def throughput_figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 8))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.2])
    bars, util = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    rows = summary["ablation"]
    names = [r["name"] for r in rows]
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red"]  # the same colour per variant in both panels
    mid = [r["samples_per_s"] for r in rows]
    spread = [r.get("samples_per_s_runs", [m]) for r, m in zip(rows, mid)]  # the repeats' range as whiskers
    bars.barh(names, mid, color=palette, xerr=[[m - min(s) for m, s in zip(mid, spread)],
                                               [max(s) - m for m, s in zip(mid, spread)]], capsize=3)
    bars.axvline(summary["rollout_only_samples_per_s"], color="k", ls=":", label="rollout alone")
    bars.axvline(summary["train_only_samples_per_s"], color="r", ls="--", label="training alone")
    bars.set_xlabel("trained samples (replies) per second, steady state (after the first update)")
    bars.set_title(f"Throughput: async {summary['speedup_async_over_sync']:.2f}x sync, overlap efficiency "
                   f"{summary['overlap_efficiency']:.2f}\n(medians of {summary.get('repeats', 1)} repeat(s), "
                   "ratios paired within a repeat; whiskers: min-max)",
                   fontsize=10)
    bars.legend(fontsize=8)
    comps = ["env", "inference", "trainer"]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        util.bar([c + i * width for c in range(len(comps))], [r["utilisation"].get(c, 0) for c in comps], width,
                 label=r["name"], color=palette[i])
    util.set_xticks([c + 0.4 - width / 2 for c in range(len(comps))], ["env workers (mean)", "inference", "trainer"])
    util.set_ylabel("busy fraction of wall-clock")
    util.set_ylim(0, 1)
    util.set_title("Utilisation per component")
    util.legend(fontsize=7)
    colors = {"step": "tab:green", "reset": "tab:olive", "sample": "tab:blue", "train": "tab:red",
              "refresh": "k", "drain": "tab:orange"}
    for col, name in enumerate(("sync", "async (full)")):
        ax = fig.add_subplot(grid[1, col])
        spans = summary["timelines"][name]
        lanes = sorted({s["component"] for s in spans}, key=lambda c: (not c.startswith("env"), c))
        for s in spans:
            if s["kind"] in colors:
                ax.barh(lanes.index(s["component"]), s["end"] - s["start"], left=s["start"],
                        color=colors[s["kind"]], height=0.7)
        ax.set_yticks(range(len(lanes)), lanes, fontsize=7)
        ax.set_xlabel("seconds")
        ax.set_title(f"Timeline, {name}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc="lower center", ncol=len(colors), fontsize=8)
    fig.suptitle(f"asyncwebrl throughput benchmark (commit {summary['commit']}; {summary['machine']})", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


PAPER_SPEEDUP = 2.9  # the paper's end-to-end throughput over WebGym's synchronous pipeline (48 + 16 H100s)


VARIANT_COLOURS = {"sync": "tab:blue", "async, staleness 0": "tab:purple", "async, drained pool": "tab:orange",
                   "async, screenshots by value": "tab:green", "async (full)": "tab:red"}


def _vs_sync_bars(ax, names, ratios, title, whiskers=None):
    palette = [VARIANT_COLOURS.get(n, "tab:grey") for n in names]
    err = None if whiskers is None else [[r - min(w) for r, w in zip(ratios, whiskers)],
                                         [max(w) - r for r, w in zip(ratios, whiskers)]]
    ax.barh(names, ratios, color=palette, xerr=err, capsize=3)
    for i, r in enumerate(ratios):
        ax.text(r if whiskers is None else max(whiskers[i]), i, f" {r:.2f}x", va="center", fontsize=8)
    ax.axvline(PAPER_SPEEDUP, color="k", ls="--", lw=1, label=f"paper: up to {PAPER_SPEEDUP}x (64 H100s)")
    ax.set_xlabel("trained throughput / sync")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def paper_scale_figure(result: dict, path: Path) -> None:
    """experiments/paper_scale.py: the ablation bars and the two sweeps, every panel labelled SIMULATED."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = result["variants"]
    sweeps = [(k, x, lab) for k, x, lab in (
        ("sweep_spread", "length_cv", "spread of episode lengths (coefficient of variation)"),
        ("sweep_train", "train_over_rollout", "train time / rollout time per update (each alone)")) if result.get(k)]
    fig, axes = plt.subplots(1, 1 + len(sweeps), figsize=(5.5 * (1 + len(sweeps)), 4.2), squeeze=False)
    _vs_sync_bars(axes[0][0], list(v), [r["vs_sync"] for r in v.values()],
                  f"SIMULATED, paper scale: overlap efficiency {result['overlap_efficiency']:.2f}")
    for ax, (key, x, label) in zip(axes[0][1:], sweeps):
        rows = result[key]
        ax.plot([r[x] for r in rows], [r["ratio"] for r in rows], "o-", color="tab:red")
        ax.axhline(1, color="grey", lw=0.8)
        if key == "sweep_spread":
            ax.axvline(v["async (full)"]["length_cv"], color="k", ls=":", lw=1, label="default profile")
        else:
            ax.axvline(result["rollout_over_train"] ** -1, color="k", ls=":", lw=1, label="default profile")
        ax.set_xlabel(label)
        ax.set_ylabel("async / sync (trained trajectories per second)")
        ax.set_title("SIMULATED: " + ("length spread" if key == "sweep_spread" else "train vs rollout time"),
                     fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("04's scheduler on simulated time, the paper's workload (experiments/paper_scale.py; stand-in "
                 "envs, engine and trainer, not GPUs)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig1_figure(measured: dict, simulated: dict | None, path: Path) -> None:
    """fig. 1: async against sync, the CPU benchmark (measured) beside the paper-scale study (simulated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    rows = measured["ablation"]
    _vs_sync_bars(axes[0], [r["name"] for r in rows], [r["vs_sync"] for r in rows],
                  f"MEASURED on {measured.get('cores', 'the')} CPU cores, tiny model, engine {measured.get('engine', 'hf')}"
                  f"\nmedian of {measured.get('repeats', 1)} paired repeats "
                  f"(whiskers min-max); overlap efficiency {measured['overlap_efficiency']:.2f}",
                  whiskers=[r.get("vs_sync_runs", [r["vs_sync"]]) for r in rows])
    if measured.get("cpu_ceiling_samples_per_s"):  # no pipeline can beat every core busy with useful work
        sync = next(r for r in rows if r["name"] == "sync")["samples_per_s"]
        axes[0].axvline(measured["cpu_ceiling_samples_per_s"] / sync, color="grey", ls=":", lw=1.5,
                        label=f"CPU ceiling of {measured['cores']} cores")
        axes[0].legend(fontsize=7, loc="lower right")
    if simulated is not None:
        v = simulated["variants"]
        _vs_sync_bars(axes[1], list(v), [r["vs_sync"] for r in v.values()],
                      "SIMULATED, the paper's scale (48 engines, G=8, 16 groups)\n04's scheduler, stand-in durations; "
                      f"overlap efficiency {simulated['overlap_efficiency']:.2f}")
    else:
        axes[1].text(0.5, 0.5, "no figures/paper_scale.json:\npython -m experiments.paper_scale", ha="center")
        axes[1].set_axis_off()
    fig.suptitle("Fig. 1: end-to-end trained throughput, async against sync", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
