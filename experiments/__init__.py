"""Scripts that drive the whole pipeline and measure it: the benchmarks, the learning experiment, the fault soak and
the kill-and-resume check, 04's demo and the GPU check. Not helpers: no numbered file imports them (04's `main` only
hands its command line to its demo here). Run each from the repository root as `python -m experiments.<name>`;
figures/NOTEBOOK.md records what they measured, next to the logs in figures/."""
