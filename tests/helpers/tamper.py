"""What someone who edits an export or a run folder by hand does next: list the files' new SHA-256 and
seal the JSON again. The manifests catch damage, not such an edit (docs/training.md, "What is safe to
load"); tests that need an edited file past the hashes use these."""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

from notellm2.files import atomic_write_json, hash_files, seal_json, tree_files


def reseal_export(export_dir: str, edit: Optional[Callable[[dict], None]] = None) -> dict:
    """Re-list the export's file hashes (and apply `edit` to its JSON first), sealed again."""
    from notellm2.modeling.pretrained import EXPORT_META

    path = os.path.join(export_dir, EXPORT_META)
    with open(path) as fh:
        meta = json.load(fh)
    if edit is not None:
        edit(meta)
    meta["files"] = hash_files(export_dir, tree_files(export_dir, exclude=(EXPORT_META,)))
    meta = seal_json(meta)
    atomic_write_json(path, meta)
    return meta


def reseal_checkpoint(path: str) -> dict:
    """Re-list a checkpoint folder's file hashes in its manifest, sealed again."""
    from notellm2.launcher.train.checkpoint import MANIFEST

    mpath = os.path.join(path, MANIFEST)
    with open(mpath) as fh:
        manifest = json.load(fh)
    manifest["files"] = hash_files(path, tree_files(path, exclude=(MANIFEST,)))
    manifest = seal_json(manifest)
    atomic_write_json(mpath, manifest)
    return manifest
