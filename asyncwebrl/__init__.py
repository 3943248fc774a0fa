"""Glue for the numbered files: `load("01_env")` imports 01_env.py as a module.

Python cannot `import 01_env` (a module name cannot start with a digit), so every numbered file, helper and
test loads the earlier files through this one function, and nothing touches sys.path.
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    """Return the module of ROOT/<name>.py (e.g. "01_env"), executing it once per process."""
    path = (ROOT / f"{name}.py").resolve()
    if not path.is_file():
        raise ModuleNotFoundError(f"no numbered file {path.name} in {ROOT}")
    # `python 01_env.py` runs the file as __main__: hand that same module to helpers, so that the script and
    # the helpers it calls share one copy of every class (isinstance would fail across two copies).
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if main_file and Path(main_file).resolve() == path:
        return main
    # registered under the file's own stem ("01_env"), so that dataclasses, pickle and tools that map a module back
    # to its file (mutation testing) find it; no `import` statement can reach that name, so it collides with none
    key = name
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]
