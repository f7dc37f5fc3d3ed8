"""tinystories: train small GPT-style language models from scratch on TinyStories."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(name_or_path: str = "tiny", **kwargs):
    """Load a trained model (a run dir, a checkpoint dir or a shipped model name) for generation.

    Returns an object with `.generate(prompt, ...)`, `.tokenizer`, `.model` and `.config`.
    """
    from tinystories.generate import load_model as _load_model

    return _load_model(name_or_path, **kwargs)
