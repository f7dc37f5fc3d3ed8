"""tinystories: train small GPT-style language models from scratch on TinyStories."""

import os as _os

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]

# OpenMP's wait policy, chosen before torch (and its libgomp) is imported. libgomp's default spins up
# to ~300,000 iterations while a thread waits for the others; with another program on one of two
# cores, the spinning thread steals the core the late thread needs and a 2-thread step gets up to
# several times slower. Yielding sooner costs the quiet case little (benchmarks/contention.py
# measures both). Any of these variables set by the user wins; nothing is changed if torch was
# imported first (libgomp reads them once, when it loads).
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
DEFAULT_OPENMP_WAIT = {"GOMP_SPINCOUNT": "10000"}


def _prefer_yielding_openmp_threads() -> None:
    if not any(name in _os.environ for name in OPENMP_WAIT_VARIABLES):
        _os.environ.update(DEFAULT_OPENMP_WAIT)


_prefer_yielding_openmp_threads()


def load_model(name_or_path: str = "tiny", **kwargs):
    """Load a trained model (a run dir, a checkpoint dir or a shipped model name) for generation.

    Returns an object with `.generate(prompt, ...)`, `.tokenizer`, `.model` and `.config`.
    """
    from tinystories.generate import load_model as _load_model

    return _load_model(name_or_path, **kwargs)
