"""What each optional install (pyproject's extras) brings, and the one sentence a command missing it prints.

    pip install cutegpt            chat, generate, serve, export, eval, vocab (torch, transformers, gguf, xllamacpp, ...)
    pip install 'cutegpt[train]'   + train, recipe, data, --lora, --load-in-8bit (peft, trl, accelerate, datasets, ...)
    pip install 'cutegpt[test]'    + what the test suite needs (train included)

Every import of these packages is inside the function that needs it, so the core commands
start without them (tests/test_extras.py walks the import graph).
"""

from __future__ import annotations

import importlib.util

from cutegpt.errors import CuteGPTError

# top-level module -> (PyPI name, extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "peft": ("peft", "train"),
    "trl": ("trl", "train"),
    "accelerate": ("accelerate", "train"),
    "datasets": ("datasets", "train"),
    "pyarrow": ("pyarrow", "train"),
    "deepspeed": ("deepspeed", "train"),
    "bitsandbytes": ("bitsandbytes", "train"),
    "optimum": ("optimum-quanto", "train"),
    "tensorboard": ("tensorboard", "train"),
}


def install_line(extra: str) -> str:
    return f"pip install 'cutegpt[{extra}]' (in a clone: pip install -e '.[{extra}]')"


def missing_message(module: str | None, what: str = "this command") -> str | None:
    """The sentence for a missing optional module (None when `module` is not one of ours)."""
    top = (module or "").split(".")[0]
    if top not in OPTIONAL:
        return None
    package, extra = OPTIONAL[top]
    return f"{what} needs {package}, which the {extra} extra installs: {install_line(extra)}."


def require(modules: tuple[str, ...], what: str) -> None:
    """Refuse to start `what` when one of `modules` is not installed (before anything loads or is written)."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
            found = False
        if not found:
            raise CuteGPTError(missing_message(module, what) or f"{what} needs the package {module}: pip install {module}.")
