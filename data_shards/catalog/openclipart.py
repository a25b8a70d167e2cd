"""A real catalog from Debian's `openclipart-svg` + `openclipart-png` packages.

Each clip-art item becomes a note: title (dc:title), content (dc:description), topics (dc:subject
keywords), the pre-rendered PNG as its image, and its leaf folder as its category. Categories with
fewer than `min_per_category` items are dropped. The result is a JSONL catalog in the documented
format (docs/data.md).

For the benchmark catalog (docs/benchmark.md) two shapings apply after that filter, both by a hash of
the note id (data_shards/catalog/shaping.py): at most `max_per_category` notes per category, and the
text (title, topics, content) of a `blank_text_fraction` of the notes emptied, as in image-only posts.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict

from notellm2.data_shards.catalog.shaping import blank_text, cap_per_category
from notellm2.outputs import FileOutput, check_file_output

DEFAULT_ROOT = "/usr/share/openclipart"
_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_DESC = re.compile(r"<dc:description>(.*?)</dc:description>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.S)
_NOISE_TOPICS = {"unsorted", "", "clip art", "clipart", "media", "image", "png", "svg"}


def _unescape(text: str) -> str:
    return (text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&apos;", "'")
            .replace("&amp;", "&").strip())


def parse_svg_metadata(svg_text: str) -> dict:
    """Title, description and subject keywords of the item itself (not its creator or publisher)."""
    work = _WORK.search(svg_text)
    block = work.group(0) if work else ""
    # The item's own title comes before nested agent blocks (publisher/creator also use dc:title).
    head = re.split(r"<dc:(publisher|creator|rights)\b", block, maxsplit=1)[0]
    title = _TITLE.search(head)
    desc = _DESC.search(head)
    subject = _SUBJECT.search(block)
    topics = [_unescape(t) for t in _LI.findall(subject.group(1))] if subject else []
    topics = [t for t in dict.fromkeys(topics) if t.lower() not in _NOISE_TOPICS]
    return {"title": _unescape(title.group(1)) if title else "", "content": _unescape(desc.group(1)) if desc else "",
            "topics": topics}


def build_openclipart_catalog(out_path: str, root: str = DEFAULT_ROOT, min_per_category: int = 20,
                              max_items: int | None = None, max_per_category: int | None = None,
                              blank_text_fraction: float = 0.0, blank_seed: int = 0, overwrite: bool = True) -> dict:
    """Write the catalog JSONL to `out_path`; returns {"notes", "categories", "skipped", "capped", "blanked"}:
    `capped` counts the notes over `max_per_category`, `blanked` those whose text was emptied. A file of
    other contents there is replaced only with `overwrite` (notellm2.outputs.FileOutput: checked before
    the catalog is read, compared at the end)."""
    check_file_output(out_path)
    svg_root, png_root = os.path.join(root, "svg"), os.path.join(root, "png")
    if not os.path.isdir(svg_root) or not os.path.isdir(png_root):
        raise FileNotFoundError(f"{root}: expected svg/ and png/ folders (apt-get install openclipart-svg openclipart-png)")
    by_category: dict[str, list[dict]] = defaultdict(list)
    skipped = defaultdict(int)
    for dirpath, _, files in sorted(os.walk(svg_root)):
        for name in sorted(files):
            if not name.endswith(".svg"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), svg_root)
            png = os.path.join(png_root, rel[:-4] + ".png")
            if not os.path.exists(png):
                skipped["no_png"] += 1
                continue
            with open(os.path.join(dirpath, name), errors="replace") as fh:
                meta = parse_svg_metadata(fh.read(20000))
            if not meta["title"]:
                skipped["no_title"] += 1
                continue
            category = os.path.dirname(rel)
            note_id = "oc-" + rel[:-4].replace(os.sep, "-")
            by_category[category].append({"note_id": note_id, **meta, "image": png, "category": category,
                                          "timestamp": None})
    kept = {c: items for c, items in by_category.items() if len(items) >= min_per_category}
    skipped["small_category"] = sum(len(v) for c, v in by_category.items() if c not in kept)
    notes = [n for c in sorted(kept) for n in kept[c]]
    capped = cap_per_category(notes, max_per_category)
    skipped_by_cap, notes = len(notes) - len(capped), capped
    if max_items:
        notes = notes[:max_items]
    blanked = blank_text(notes, blank_text_fraction, blank_seed) if blank_text_fraction else 0
    with FileOutput(out_path, overwrite, "a catalog") as out, open(out.tmp, "w", encoding="utf-8") as fh:
        for n in notes:
            fh.write(json.dumps(n, ensure_ascii=False) + "\n")
    return {"notes": len(notes), "categories": len({n["category"] for n in notes}), "skipped": dict(skipped),
            "capped": skipped_by_cap, "blanked": blanked, **({"unchanged": True} if out.unchanged else {})}
