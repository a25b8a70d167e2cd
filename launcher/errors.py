"""The errors a user causes (a bad config, a folder that is not an export, a malformed pairs file, a
missing input), as opposed to bugs. `launcher.cli.main` prints any of them as one line on stderr
and exits 2; everything else keeps its traceback.

The launcher's own error types subclass `UserError`. The data package must not import the launcher,
so its error types are named here by module and class (`DATA_ERRORS`) and matched only when their
module is already imported: an error of a type whose module was never imported cannot have been
raised. Torch-free, so the CLI can import it before any verb runs.
"""
from __future__ import annotations

import sys


class UserError(Exception):
    """A mistake in what the user gave (file, key, sample): reported in one line, exit code 2."""


# (module, class) of the user-facing errors of packages that cannot import this module.
DATA_ERRORS = (
    ("data_shards.catalog", "CatalogError"),
    ("data_shards.mining", "MiningError"),
    ("data_shards.import_pairs", "PairImportError"),
    ("data_shards.writer", "ShardWriteError"),
    ("data_shards.images", "BadImage"),
    ("data_shards.vision_cache", "VisionCacheError"),
    ("modeling.vision", "VisionError"),
    ("modeling.prompts", "PromptError"),
)


def user_error_types() -> tuple[type, ...]:
    """Every user-facing error type that can have been raised in this process."""
    found = [UserError, FileNotFoundError]
    for module, name in DATA_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined with ' | ')."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())
