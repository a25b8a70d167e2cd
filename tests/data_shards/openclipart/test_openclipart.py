import json
import os

import pytest

from notellm2.data_shards.catalog.openclipart import build_openclipart_catalog, parse_svg_metadata

SVG = """<svg><metadata><rdf:RDF><cc:Work rdf:about="">
<dc:title>Red &amp; blue bat</dc:title><dc:description>A bat at night</dc:description>
<dc:subject><rdf:Bag><rdf:li>mammal</rdf:li><rdf:li>unsorted</rdf:li><rdf:li>bat</rdf:li><rdf:li>bat</rdf:li></rdf:Bag></dc:subject>
<dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
<dc:creator><cc:Agent><dc:title>Someone</dc:title></cc:Agent></dc:creator>
</cc:Work></rdf:RDF></metadata></svg>"""


def test_metadata_is_the_items_own_not_its_publishers():
    meta = parse_svg_metadata(SVG)
    assert meta == {"title": "Red & blue bat", "content": "A bat at night", "topics": ["mammal", "bat"]}


def test_small_categories_and_items_without_png_are_dropped(tmp_path):
    root = tmp_path / "oc"
    for cat, n in (("animals/birds", 3), ("food", 1)):
        for i in range(n):
            (root / "svg" / cat).mkdir(parents=True, exist_ok=True)
            (root / "png" / cat).mkdir(parents=True, exist_ok=True)
            (root / "svg" / cat / f"x{i}.svg").write_text(SVG)
            if i != 2:
                (root / "png" / cat / f"x{i}.png").write_bytes(b"png")
    out = tmp_path / "catalog.jsonl"
    summary = build_openclipart_catalog(str(out), root=str(root), min_per_category=2)
    notes = [json.loads(line) for line in out.read_text().splitlines()]
    assert [n["note_id"] for n in notes] == ["oc-animals-birds-x0", "oc-animals-birds-x1"]
    assert all(n["category"] == os.path.join("animals", "birds") for n in notes)
    assert summary["skipped"] == {"no_png": 1, "small_category": 1}


@pytest.mark.skipif(not os.path.isdir("/usr/share/openclipart/svg"), reason="openclipart packages not installed")
def test_the_real_package_gives_thousands_of_notes_in_many_categories(tmp_path):
    summary = build_openclipart_catalog(str(tmp_path / "c.jsonl"))
    assert summary["notes"] > 3000 and summary["categories"] > 50
