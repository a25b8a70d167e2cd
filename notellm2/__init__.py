"""notellm2: training stack for NoteLLM-2 style multimodal note encoders (item-to-item recommendation).

The import root. The three packages live in the repository's top-level folders and install under this
name (setup.py's `package_dir`): `notellm2.modeling` (the encoder, a library: torch + transformers),
`notellm2.data_shards` (catalogs, mining, shards, the streaming reader) and `notellm2.launcher` (the
application: CLI, training, evaluation, export). The DeepSpeed JSONs and the shipped configs install as
package data (`notellm2/ds_configs`, `notellm2/configs`); `resource_path` finds them in an installed
package and in a source checkout alike.

This module imports nothing of the three packages (docs/layout.md draws what may import what).
"""
from __future__ import annotations

import os

__version__ = "0.2.0"

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

# In a source checkout this folder holds only the import root's own modules; the packages are its
# siblings. Putting the checkout on this package's search path makes `notellm2.launcher` that
# checkout's `launcher/` even when another checkout is installed (editable) in the same environment
# (scripts/compare_scalars.py runs two checkouts side by side). An installed wheel has the packages
# inside this folder, and this branch is not taken.
if (not os.path.isdir(os.path.join(_HERE, "launcher"))
        and os.path.isfile(os.path.join(_ROOT, "setup.py"))
        and os.path.isfile(os.path.join(_ROOT, "launcher", "cli", "__init__.py"))):
    __path__.append(_ROOT)  # noqa: F821 (a package's __path__)


def resource_path(*parts: str) -> str:
    """The path of a file shipped with the package (`resource_path("ds_configs", "zero3_bf16.json")`),
    in an installed wheel or a source checkout; the path need not exist (the caller says what is missing)."""
    for base in __path__:  # noqa: F821
        candidate = os.path.join(base, *parts)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(__path__[0], *parts)  # noqa: F821


def find_shipped(path: str) -> str:
    """A user-given path as is when it exists (absolute, or relative to the working directory);
    otherwise the file or folder of that relative name shipped with the package (`ds_configs/...`,
    `configs/...`) when there is one; otherwise `path` unchanged, for the caller's error message."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    shipped = resource_path(path)
    return shipped if os.path.exists(shipped) else path


def shipped_root() -> str:
    """Where the shipped files are looked up (for error messages)."""
    return __path__[-1]  # noqa: F821
