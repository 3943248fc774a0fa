"""Timeline: timed spans of every component of the loop (env steps per worker, inference, train, refresh, idle),
from which 04_async_loop.py's utilisation and 06_eval.py's Gantt figure are computed. Thread-safe; a run appends
its spans to RUN_DIR/timeline.jsonl as it goes, so a killed run keeps what it had written.
"""
from __future__ import annotations

import collections
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class Timeline:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.spans: list[tuple] = []  # (component, kind, start_s, end_s, info)
        self._flushed = 0  # spans already appended to the run's timeline file
        self._lock = threading.Lock()

    @contextmanager
    def span(self, component: str, kind: str, **info):
        start = time.perf_counter() - self.t0
        try:
            yield
        finally:
            with self._lock:
                self.spans.append((component, kind, start, time.perf_counter() - self.t0, info))

    def add(self, component: str, kind: str, start: float, end: float, **info) -> None:
        """A span timed elsewhere (perf_counter values; another process on this machine: the same clock)."""
        with self._lock:
            self.spans.append((component, kind, start - self.t0, end - self.t0, info))

    def utilisation(self, wall: float | None = None) -> dict[str, float]:
        """Busy fraction per component (idle spans excluded); env workers are averaged into "env"."""
        wall = wall or max((s[3] for s in self.spans), default=1.0)
        busy = collections.defaultdict(float)
        workers = {s[0] for s in self.spans if s[0].startswith("env/")}
        for comp, kind, a, b, _ in self.spans:
            if kind != "idle":
                busy["env" if comp.startswith("env/") else comp] += b - a
        if workers:
            busy["env"] /= len(workers)
        return {k: round(v / wall, 4) for k, v in busy.items()}

    def dump(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._flushed = 0
        self.flush(path)

    def flush(self, path: Path, offset: float = 0.0) -> None:
        """Append the spans recorded since the last flush, their times shifted by `offset` (a resumed run's clock
        counts on from the killed run's), so that a killed run keeps what it had written."""
        with self._lock:
            new, self._flushed = self.spans[self._flushed:], len(self.spans)
        with open(path, "a") as f:
            for comp, kind, a, b, info in new:
                f.write(json.dumps(dict(component=comp, kind=kind, start=round(a + offset, 4),
                                        end=round(b + offset, 4), **info)) + "\n")
