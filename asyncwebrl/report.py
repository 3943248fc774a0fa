"""The trajectory viewer: `python 06_eval.py --html RUN_DIR` writes RUN_DIR/report.html, one self-contained page that
opens from disk with no server.

At the top the run's curves (success, steps, reply tokens per step, by policy version, from metrics.jsonl); then an
index of episodes with filters (source, task, difficulty, success, end reason, version): the training rollouts that
05 logged (trajectories/v<N>/, by the version their update made) and the episodes of every evaluation of a model in
the run directory (`06_eval.py RUN_DIR` saves their steps). Per episode, every step: the screenshot the model saw with
its action drawn on it (the click point, the mark's box, the typed text), the reply (memory and action), the parse
error, the policy version that wrote it and its staleness when trained, then the reward and the end reason. The
screenshots stay the run's own files, referenced by relative path: the page holds only the JSON of the records.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from asyncwebrl import load

env, policy_mod = load("01_env"), load("02_policy")


def target(action_text: str, marks: list, size: tuple[int, int] | None) -> dict | None:
    """Where the action acts on the screenshot (pixels): a mark's box centre or a 0..1000 point; the typed text."""
    try:
        a = env.parse_action(action_text)
    except env.ActionParseError:
        return None
    out: dict = {"label": str(a)}
    if a.mark is not None and a.mark < len(marks):
        x, y, w, h = (float(v) for v in marks[a.mark])
        out.update(x=x + w / 2, y=y + h / 2, box=[x, y, w, h])
    elif a.kind == "click" and a.x is not None and size:
        out.update(x=size[0] * a.x / 1000, y=size[1] * a.y / 1000)
    if a.kind == "type":
        out["text"] = a.text
    return out


def _reward(v) -> float:
    if _finite(float(v)) is None:
        raise ValueError(f"reward {v!r}")
    return float(v)


def _finite(v):
    """A number JSON can carry (a mean over nothing is NaN in metrics.jsonl, which JSON.parse refuses), else None."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _size(path: Path) -> list[int] | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return list(img.size)
    except (OSError, ValueError, Image.DecompressionBombError):  # missing, not an image
        return None


def _step(run_dir: Path, image: Path | None, memory: str, action: str, error, version, staleness, marks, tokens):
    size = _size(image) if image is not None and image.resolve().is_relative_to(run_dir.resolve()) else None
    where = target(action, marks, size)
    if where and not all(_finite(v) is not None for k, v in where.items() if k in ("x", "y")):
        where = None  # a damaged box: nothing to draw
    return dict(image=image.relative_to(run_dir).as_posix() if size else None, size=size, memory=memory,
                action=action, error=None if error is None else str(error), version=_finite(version),
                staleness=_finite(staleness), tokens=_finite(tokens), target=where)


def collect(run_dir: Path) -> dict:
    """The report's data: the curves and every logged episode, from the run directory's files alone."""
    metrics = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a row cut by a kill
                continue
            metrics.append({k: _finite(row.get(k)) for k in ("version", "success", "rollout_success", "steps",
                                                              "tokens_per_step")})
    episodes, skipped = [], []
    for f in sorted(run_dir.glob("trajectories/v*/traj*/trajectory.json")):
        try:
            episodes.append(_trajectory(run_dir, f))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):  # cut by a kill, or not ours
            skipped.append(f.relative_to(run_dir).as_posix())
    for f in sorted(run_dir.glob("**/eval-*.json")):
        try:
            episodes += _evaluation(run_dir, f)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
            skipped.append(f.relative_to(run_dir).as_posix())
    for i, ep in enumerate(episodes):
        ep.update(id=i, success=ep["reward"] > 0)
    return dict(run=run_dir.name, metrics=metrics, episodes=episodes, skipped=skipped)


def _trajectory(run_dir: Path, f: Path) -> dict:
    """A training trajectory 05 logged (trajectories/v<N>/traj<id>/trajectory.json)."""
    t, version = json.loads(f.read_text()), int(f.parent.parent.name[1:])
    trained_at, steps = t.get("trained_at", version - 1), []
    for s in t["steps"]:
        reply = policy_mod.parse_response(str(s["reply"]))
        steps.append(_step(run_dir, f.parent / s["screenshot"] if s.get("screenshot") else None, reply.memory,
                           reply.action_text, s["action_error"], s["version"], trained_at - s["version"],
                           s.get("marks", []), s.get("tokens")))
    return dict(source="train", version=version, task=str(t["task"]), difficulty=str(t.get("difficulty", "")),
                reward=_reward(t["reward"]), end=str(t["end"]), steps=steps)


def _evaluation(run_dir: Path, f: Path) -> list[dict]:
    """The episodes of one evaluation 06 saved with their steps (eval-<agent>-<split>-<mode>.json)."""
    result, out = json.loads(f.read_text()), []
    source = f"eval {result.get('split', '')} {result.get('mode', '')}".strip()
    for r in result.get("records", []):
        if "trace" in r:
            steps = [_step(run_dir, f.parent / s["screenshot"] if s.get("screenshot") else None, str(s["memory"]),
                           str(s["action"]), s["action_error"], None, None, s.get("marks", []), s.get("tokens"))
                     for s in r["trace"]]
            out.append(dict(source=source, version=None, task=str(r["task"]), difficulty=str(r.get("difficulty", "")),
                            reward=_reward(r["reward"]), end=str(r["end"]), steps=steps))
    return out


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    data = collect(run_dir)
    if not data["episodes"] and not data["metrics"]:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl, logged trajectories or evaluations to show")
    page = PAGE.replace("TITLE", html.escape(data["run"])).replace(
        "DATA", json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/"))
    out = run_dir / "report.html"
    out.write_text(page)
    if data["skipped"]:
        print(f"report: skipped {len(data['skipped'])} unreadable file(s), e.g. {data['skipped'][0]}")
    return out


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>asyncwebrl: TITLE</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
#curves { display: flex; gap: 1.5em; flex-wrap: wrap; } #curves svg { background: #fafafa; border: 1px solid #ddd; }
#filters select { margin-right: 1em; } table { border-collapse: collapse; }
#list { max-height: 40vh; overflow: auto; margin-top: .5em; display: inline-block; }
td, th { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; } tbody tr { cursor: pointer; }
tbody tr:hover { background: #eef; } .ok { color: #080; } .fail { color: #a00; }
.step { display: flex; gap: 1.5em; margin: 1em 0; padding-bottom: 1em; border-bottom: 1px solid #eee; }
.shot { position: relative; display: inline-block; line-height: 0; } .shot img { outline: 1px solid #ccc; }
.marker { position: absolute; width: 14px; height: 14px; margin: -7px 0 0 -7px; border-radius: 50%;
          background: rgba(255, 0, 0, .75); border: 2px solid #fff; box-sizing: border-box; }
.box { position: absolute; border: 2px solid rgba(255, 0, 0, .8); box-sizing: border-box; }
.typed { position: absolute; background: #ffc; border: 1px solid #aa8; padding: 2px 4px; line-height: 1.2;
         font-size: 12px; white-space: pre; transform: translate(10px, 8px); }
.reply { font-family: ui-monospace, monospace; white-space: pre-wrap; overflow-wrap: anywhere; max-width: 60em; }
.error { color: #a00; font-weight: bold; } .meta { color: #666; }
</style></head><body>
<h1>asyncwebrl run: TITLE</h1>
<div id="curves"></div>
<h2>Episodes</h2><div id="filters"></div><div id="count" class="meta"></div>
<div id="list"><table id="index"><thead><tr><th>#</th><th>source</th><th>version</th><th>task</th><th>difficulty</th>
<th>reward</th><th>end</th><th>steps</th></tr></thead><tbody></tbody></table></div>
<div id="episode"></div>
<script id="data" type="application/json">DATA</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) { if (k === 'style') Object.assign(e.style, v); else e.setAttribute(k, v); }
  for (const k of kids) e.append(k);
  return e;
}
function curve(title, key) {  // one small line plot of a metric against the policy version
  const pts = D.metrics.filter(r => typeof r[key] === 'number' && isFinite(r[key])).map(r => [r.version, r[key]]);
  const W = 260, H = 120, P = 24, ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg'); svg.setAttribute('width', W); svg.setAttribute('height', H);
  const text = (x, y, s) => { const t = document.createElementNS(ns, 'text'); t.setAttribute('x', x); t.setAttribute('y', y);
                              t.setAttribute('font-size', 11); t.textContent = s; svg.append(t); };
  text(P, 12, title);
  if (!pts.length) text(P, H / 2, '(not logged in this run)');
  if (pts.length) {
    const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs) || 1, y0 = Math.min(...ys), y1 = Math.max(...ys);
    const sx = v => P + (W - 2 * P) * (x1 > x0 ? (v - x0) / (x1 - x0) : .5);
    const sy = v => H - P + (y1 > y0 ? -(H - 2 * P) * (v - y0) / (y1 - y0) : -(H - 2 * P) / 2);
    const line = document.createElementNS(ns, 'polyline');
    line.setAttribute('points', pts.map(p => sx(p[0]) + ',' + sy(p[1])).join(' '));
    line.setAttribute('fill', 'none'); line.setAttribute('stroke', '#36c'); line.setAttribute('stroke-width', 1.5);
    svg.append(line);
    text(2, H - P + 4, y0.toFixed(2)); text(2, P + 4, y1.toFixed(2)); text(P, H - 4, 'version ' + x0 + '-' + x1);
  }
  return svg;
}
const C = document.getElementById('curves');
for (const [t, k] of [['success (trained)', 'success'], ['success (all rollouts)', 'rollout_success'],
                      ['steps per trajectory', 'steps'], ['reply tokens per step', 'tokens_per_step']]) C.append(curve(t, k));
const FIELDS = [['source', e => e.source], ['task', e => e.task], ['difficulty', e => e.difficulty],
                ['success', e => e.success ? 'yes' : 'no'], ['end', e => e.end], ['version', e => String(e.version ?? '-')]];
const F = document.getElementById('filters');
for (const [name, get] of FIELDS) {
  const values = [...new Set(D.episodes.map(get))].sort((a, b) => a.localeCompare(b, undefined, {numeric: true}));
  const s = el('select', {id: 'f-' + name}, el('option', {value: ''}, name + ': all'));
  for (const v of values) s.append(el('option', {value: v}, v));
  s.onchange = renderIndex; F.append(s);
}
function renderIndex() {
  const want = FIELDS.map(([name, get]) => [get, document.getElementById('f-' + name).value]);
  const rows = D.episodes.filter(e => want.every(([get, v]) => !v || get(e) === v));
  const body = document.querySelector('#index tbody'); body.replaceChildren();
  for (const e of rows) {
    const tr = el('tr', {'data-id': e.id}, el('td', {}, e.id), el('td', {}, e.source), el('td', {}, e.version ?? '-'),
                  el('td', {}, e.task), el('td', {}, e.difficulty), el('td', {class: e.success ? 'ok' : 'fail'}, e.reward),
                  el('td', {}, e.end), el('td', {}, e.steps.length));
    tr.onclick = () => { location.hash = 'ep' + e.id; };
    body.append(tr);
  }
  document.getElementById('count').textContent = rows.length + ' of ' + D.episodes.length + ' episodes';
}
function renderEpisode() {
  const box = document.getElementById('episode'), m = location.hash.match(/^#ep(\\d+)$/);
  box.replaceChildren();
  if (!m || !D.episodes[+m[1]]) return;
  const e = D.episodes[+m[1]];
  box.append(el('h2', {id: 'episode-title'}, 'Episode ' + e.id + ': ' + e.task + ' (' + e.source +
                (e.version !== null ? ', trained in the update to version ' + e.version : '') + ')'),
             el('div', {class: e.success ? 'ok' : 'fail'}, 'reward ' + e.reward + ', end: ' + e.end + ', ' +
                e.steps.length + ' steps'));
  e.steps.forEach((s, i) => {
    const shot = el('div', {class: 'shot'});
    if (s.image) {
      const t = s.target, [W, H] = s.size;  // shown at twice a MiniWoB++ task area, at most 640 px wide
      shot.append(el('img', {src: s.image, alt: 'step ' + i, width: Math.min(2 * W, 640)}));
      if (t && t.box) shot.append(el('div', {class: 'box', style: {left: 100 * t.box[0] / W + '%', top: 100 * t.box[1] / H + '%',
                                             width: 100 * t.box[2] / W + '%', height: 100 * t.box[3] / H + '%'}}));
      if (t && t.x !== undefined) shot.append(el('div', {class: 'marker', style: {left: 100 * t.x / W + '%', top: 100 * t.y / H + '%'}}));
      if (t && t.text !== undefined && t.x !== undefined)
        shot.append(el('div', {class: 'typed', style: {left: 100 * t.x / W + '%', top: 100 * t.y / H + '%'}}, t.text));
    } else shot.append(el('div', {class: 'meta'}, '(no screenshot)'));
    const info = el('div', {},
      el('div', {class: 'meta'}, 'step ' + i + (s.version !== null ? ', written by version ' + s.version +
         ', staleness ' + s.staleness : '') + (s.tokens !== null && s.tokens !== undefined ? ', ' + s.tokens + ' tokens' : '')),
      el('div', {class: 'reply'}, 'Memory: ' + s.memory + '\\nAction: ' + s.action));
    if (s.error) info.append(el('div', {class: 'error'}, 'parse error: ' + s.error));
    box.append(el('div', {class: 'step'}, shot, info));
  });
  box.scrollIntoView();
}
window.onhashchange = renderEpisode;
renderIndex(); renderEpisode();
</script></body></html>
"""
