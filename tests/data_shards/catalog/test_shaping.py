"""Shaping a catalog for the benchmark (data_shards/catalog/shaping.py): the per-category cap and the
blanked-text fraction choose notes by a hash of the id, stably and independently of the mining's split."""
from __future__ import annotations

import json

import pytest

from notellm2.data_shards.catalog.shaping import blank_text, cap_per_category, unit
from notellm2.data_shards.mining.mine import MiningSettings, hash_split_of


def _notes(spec: dict) -> list[dict]:
    """{"cat": n} -> n notes per category, ids cat-0, cat-1, ..., with text."""
    return [{"note_id": f"{c}-{i}", "title": f"t {c} {i}", "topics": [c], "content": "body", "category": c,
             "image": f"{c}-{i}.png"} for c, n in spec.items() for i in range(n)]


def test_the_cap_keeps_the_smallest_hashes_of_each_category_in_catalog_order():
    notes = _notes({"birds": 10, "cars": 2, None: 5})
    kept = cap_per_category(notes, 3)
    birds = [n["note_id"] for n in kept if n["category"] == "birds"]
    assert birds == sorted(birds, key=lambda i: int(i.split("-")[1]))  # catalog order kept
    expected = sorted((n["note_id"] for n in notes if n["category"] == "birds"), key=lambda i: unit("cap", i))[:3]
    assert set(birds) == set(expected)
    assert [n["note_id"] for n in kept if n["category"] == "cars"] == ["cars-0", "cars-1"]  # under the cap: all
    assert sum(n["category"] is None for n in kept) == 3  # no category: one group of its own
    # stable: another category's notes (or their order) do not change which birds stay
    more = cap_per_category(list(reversed(notes)) + _notes({"fish": 7}), 3)
    assert {n["note_id"] for n in more if n["category"] == "birds"} == set(birds)
    assert cap_per_category(notes, None) == notes
    with pytest.raises(ValueError, match="max_per_category: got 0"):
        cap_per_category(notes, 0)


def test_blanking_empties_every_text_field_of_a_hashed_fraction_and_keeps_the_image():
    notes = _notes({"a": 1000, "b": 1000})
    n = blank_text(notes, 0.5, seed=0)
    blank = [x for x in notes if not x["title"]]
    assert n == len(blank) and 900 < n < 1100
    assert all(x["topics"] == [] and x["content"] == "" and x["image"] for x in blank)
    assert all(x["title"] and x["topics"] and x["content"] for x in notes if x not in blank)
    ids = {x["note_id"] for x in blank}
    assert ids == {x["note_id"] for x in notes if unit("blank-text:0", x["note_id"]) < 0.5}
    # a smaller fraction blanks a subset (same seed); another seed another set
    fewer = _notes({"a": 1000, "b": 1000})
    blank_text(fewer, 0.2, seed=0)
    assert {x["note_id"] for x in fewer if not x["title"]} < ids
    other = _notes({"a": 1000, "b": 1000})
    blank_text(other, 0.5, seed=1)
    assert {x["note_id"] for x in other if not x["title"]} != ids
    assert blank_text(_notes({"a": 50}), 0.0) == 0 and blank_text(_notes({"a": 50}), 1.0) == 50
    with pytest.raises(ValueError, match="blank_text_fraction: got 1.5"):
        blank_text(notes, 1.5)


def test_blanking_is_independent_of_the_mining_hash_split():
    """The split hashes sha256("<seed>:<id>") too; with the same salt every test note would be blanked
    (test = the smallest hashes). With its own salt the blanked share is the same in every split."""
    notes = _notes({"a": 3000})
    blank_text(notes, 0.5, seed=0)
    settings = MiningSettings(split_by="hash", test_fraction=0.3, val_fraction=0.15, seed=0)
    for split in ("train", "val", "test"):
        members = [x for x in notes if hash_split_of(x["note_id"], settings) == split]
        share = sum(not x["title"] for x in members) / len(members)
        assert 0.42 < share < 0.58, (split, len(members), share)


def test_the_cli_caps_and_blanks_and_refuses_bad_values(tmp_path, capsys):
    from notellm2.launcher.cli import main

    root = tmp_path / "oc"
    svg = ('<svg><metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>item {i}</dc:title>'
           '<dc:description>about {i}</dc:description></cc:Work></rdf:RDF></metadata></svg>')
    for cat, n in (("animals/birds", 30), ("food", 5)):
        (root / "svg" / cat).mkdir(parents=True)
        (root / "png" / cat).mkdir(parents=True)
        for i in range(n):
            (root / "svg" / cat / f"x{i}.svg").write_text(svg.format(i=i))
            (root / "png" / cat / f"x{i}.png").write_bytes(b"png")
    out = tmp_path / "c.jsonl"
    rc = main(["data", "import-openclipart", "--root", str(root), "--out", str(out), "--min-per-category", "2",
               "--max-per-category", "10", "--blank-text-fraction", "0.5", "--blank-seed", "3"])
    assert rc == 0
    notes = [json.loads(line) for line in out.read_text().splitlines()]
    assert [sum(n["category"] == c for n in notes) for c in ("animals/birds", "food")] == [10, 5]
    blank = {n["note_id"] for n in notes if not n["title"] and not n["content"] and not n["topics"]}
    assert blank == {n["note_id"] for n in notes if unit("blank-text:3", n["note_id"]) < 0.5} and blank
    assert all(n["image"] for n in notes)
    for bad, msg in ((["--blank-text-fraction", "2"], "argument --blank-text-fraction: 2.0: must be in [0.0, 1.0]"),
                     (["--max-per-category", "0"], "argument --max-per-category: 0: must be an integer >= 1")):
        assert main(["data", "import-openclipart", "--root", str(root), "--out", str(tmp_path / "x.jsonl"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
