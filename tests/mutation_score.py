"""Mutation score of the loss (03) and the loop (04 with what it moved to the package: its learner, records and fault
handling, asyncwebrl/learner.py, records.py, faults.py) from a finished
`mutmut run` (see README, "Mutation testing").

    pip install -e .[mutation] && mutmut run --max-children 2 && python tests/mutation_score.py

A mutant counts as killed when a test failed on it, timed out (a mutant that makes the loop hang is caught) or
crashed the test process (segfault). A mutant mutmut has not run yet is counted apart, never as killed. Left
out of the score, as they are not the loss or the loop's scheduling and learning: the demos and figures (main,
real_run, _figure, which no test runs). Prints the score
of each part and every surviving mutant's name (`mutmut show NAME` prints its diff).
"""
import subprocess
import sys

LEFT_OUT = ("x_main_", "x_real_run_", "x__figure_")
PARTS = (("loss (03_grpo_loss.py)", ("03_grpo_loss.",)),
         ("loop (04_async_loop.py, asyncwebrl/learner.py, records.py, faults.py)",
          ("04_async_loop.", "asyncwebrl.learner.", "asyncwebrl.records.", "asyncwebrl.faults.")))


def results() -> list[tuple[str, str]]:
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    rows = [line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line]
    return [(name, status) for name, status in rows if name.startswith(sum((p for _, p in PARTS), ()))]


def main() -> int:
    rows = [(n, s) for n, s in results() if not n.rsplit(".", 1)[1].startswith(LEFT_OUT)]
    for part, prefix in PARTS:
        mine = [(n, s) for n, s in rows if n.startswith(prefix)]
        run = [(n, s) for n, s in mine if s != "not checked"]
        killed = sum(s in ("killed", "timeout", "segfault") for _, s in run)
        print(f"{part}: {killed} of {len(run)} killed ({100 * killed / max(len(run), 1):.1f}%)"
              + (f"; {len(mine) - len(run)} not run yet" if len(run) < len(mine) else "")
              + "".join(f"; {s}: {sum(x == s for _, x in run)}" for s in sorted({x for _, x in run}) if s != "killed"))
        for n, s in mine:
            if s == "survived":
                print(f"  survived: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
