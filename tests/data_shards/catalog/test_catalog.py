import json

import pytest

from notellm2.data_shards.catalog.notes import CatalogError, Note, index_catalog, load_catalog, validate_catalog, write_catalog_jsonl
from tests.helpers.data import (synthetic_catalog, write_exif_rotated_jpeg, write_garbage, write_plain_jpeg,
                                 write_truncated_jpeg)


def _jsonl(path, records):
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def test_jsonl_fields_and_image_resolution(tmp_path):
    (tmp_path / "img").mkdir()
    write_plain_jpeg(tmp_path / "img" / "a.jpg", 20, 10)
    cat = _jsonl(tmp_path / "notes.jsonl", [
        {"note_id": "a", "title": "T", "content": "C", "topics": ["x", "y"], "image": "img/a.jpg",
         "category": "food", "timestamp": 1700000000, "extra_key": "ignored"},
        {"note_id": 7, "title": "", "content": "only content", "image": None},
        "",  # blank lines are skipped
        {"note_id": "c", "title": "笔记", "content": "c", "image": "/abs/x.png"},
    ])
    notes = load_catalog(cat)
    assert [n.note_id for n in notes] == ["a", "7", "c"]
    a = notes[0]
    assert (a.title, a.content, a.topics, a.category, a.timestamp) == ("T", "C", ["x", "y"], "food", 1700000000)
    assert a.image_path == str(tmp_path / "img" / "a.jpg")  # relative to the catalog's folder
    assert notes[1].image_path is None and notes[1].topics == [] and notes[1].category is None
    assert notes[2].image_path == "/abs/x.png" and notes[2].title == "笔记"
    # an explicit image root wins over the catalog folder
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert load_catalog(cat, image_root=str(other))[0].image_path == str(other / "img" / "a.jpg")


@pytest.mark.parametrize("line, message", [
    ('{"note_id": "a", "title": "t"', "not valid JSON"),
    ('{"title": "t", "content": "c"}', "missing required key 'note_id'"),
    ('{"note_id": "a", "content": "c"}', "missing required key 'title'"),
    ('{"note_id": "", "title": "t", "content": "c"}', "'note_id' must be a non-empty string"),
    ('{"note_id": "a", "title": 3, "content": "c"}', "'title' must be a string"),
    ('{"note_id": "a", "title": "t", "content": "c", "topics": "x"}', "'topics' must be a list"),
    ('{"note_id": "a", "title": "t", "content": "c", "timestamp": "2024-01-01"}', "'timestamp' must be an integer"),
    ('{"note_id": "a", "title": "t", "content": "c", "image": 5}', "'image' must be a string or null"),
    ('["a", "b"]', "expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    cat = _jsonl(tmp_path / "notes.jsonl", [{"note_id": "ok", "title": "t", "content": "c"}, line])
    with pytest.raises(CatalogError) as e:
        load_catalog(cat)
    assert f"{cat}:2" in str(e.value) and message in str(e.value)


def test_csv_paper_order_with_image_folder(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    write_plain_jpeg(imgs / "111.jpg", 8, 8)
    write_plain_jpeg(imgs / "222.png", 8, 8)
    write_plain_jpeg(imgs / "333", 8, 8)
    csv_path = tmp_path / "notes.csv"
    csv_path.write_text('note_id,title,content,image_id,category\n'
                        'n1,Title one,"content, with comma\nand a newline",111,food\n'
                        'n2,Title two,plain,222,\n'
                        'n3,T3,c3,333,pets\n'
                        'n4,T4,c4,,pets\n'
                        'n5,T5,c5,999,pets\n', encoding="utf-8")
    notes = load_catalog(str(csv_path), image_root=str(imgs))
    by = {n.note_id: n for n in notes}
    assert list(by) == ["n1", "n2", "n3", "n4", "n5"]
    assert by["n1"].content == "content, with comma\nand a newline" and by["n1"].category == "food"
    assert by["n1"].image_path == str(imgs / "111.jpg")
    assert by["n2"].image_path == str(imgs / "222.png") and by["n2"].category is None
    assert by["n3"].image_path == str(imgs / "333")
    assert by["n4"].image_path is None
    assert by["n5"].image_path == str(imgs / "999")  # missing: kept so that validate can report it
    # without the header row the first line is a note
    no_header = tmp_path / "nh.csv"
    no_header.write_text("n9,t,c,111,food\n", encoding="utf-8")
    assert [n.note_id for n in load_catalog(str(no_header), image_root=str(imgs))] == ["n9"]


def test_csv_wrong_column_count_names_line(tmp_path):
    p = tmp_path / "notes.csv"
    p.write_text("note_id,title,content,image_id,category\nn1,t,c,1,food\nn2,t,c\n", encoding="utf-8")
    with pytest.raises(CatalogError, match=rf"{p}:3: expected 5 columns"):
        load_catalog(str(p))


def test_format_from_extension_or_explicit(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text('{"note_id": "a", "title": "t", "content": "c"}\n')
    with pytest.raises(CatalogError, match="cannot tell the catalog format"):
        load_catalog(str(p))
    assert load_catalog(str(p), fmt="jsonl")[0].note_id == "a"
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(str(tmp_path / "nope.jsonl"))


def test_index_catalog_rejects_duplicates():
    notes = [Note("a", "t", "c"), Note("b", "t", "c"), Note("a", "t2", "c2")]
    with pytest.raises(CatalogError, match="1 duplicate note ids \\(first: a\\)"):
        index_catalog(notes)
    assert set(index_catalog(notes[:2])) == {"a", "b"}


def test_write_catalog_roundtrip(tmp_path):
    cat = synthetic_catalog(tmp_path / "c", n_notes=12)
    notes = load_catalog(cat)
    out = write_catalog_jsonl(notes, str(tmp_path / "c" / "copy.jsonl"), image_base=str(tmp_path / "c"))
    assert load_catalog(out) == notes


# ----------------------------------------------------------------------------- validate

def _problem_catalog(tmp_path):
    imgs = tmp_path / "img"
    imgs.mkdir()
    write_plain_jpeg(imgs / "good.jpg", 32, 16)
    write_exif_rotated_jpeg(imgs / "rot.jpg")
    write_truncated_jpeg(imgs / "trunc.jpg")
    write_garbage(imgs / "garbage.jpg")
    write_plain_jpeg(imgs / "big.jpg", 300, 300)
    recs = [{"note_id": "good", "title": "t", "content": "c", "image": "img/good.jpg"},
            {"note_id": "rot", "title": "t", "content": "c", "image": "img/rot.jpg"},
            {"note_id": "trunc", "title": "t", "content": "c", "image": "img/trunc.jpg"},
            {"note_id": "garbage", "title": "t", "content": "c", "image": "img/garbage.jpg"},
            {"note_id": "big", "title": "t", "content": "c", "image": "img/big.jpg"},
            {"note_id": "gone", "title": "t", "content": "c", "image": "img/gone.jpg"},
            {"note_id": "empty", "title": "  ", "content": "", "image": None},
            {"note_id": "notitle", "title": "", "content": "c"},
            '{"note_id": broken',
            ]
    recs += [{"note_id": f"d{i}", "title": "t", "content": "c"} for i in range(7)] * 2  # 7 duplicated ids
    return _jsonl(tmp_path / "notes.jsonl", recs)


@pytest.mark.parametrize("workers", [1, 2])
def test_validate_reports_each_problem_with_counts_and_first_ids(tmp_path, workers):
    cat = _problem_catalog(tmp_path)
    r = validate_catalog(cat, max_pixels=50_000, workers=workers)
    d = r.to_dict()
    probs = d["problems"]
    assert d["records"] == 9 + 14 and d["notes_with_image"] == 6
    assert probs["duplicate_id"]["count"] == 7 and probs["duplicate_id"]["first"] == ["d0", "d1", "d2", "d3", "d4"]
    assert probs["missing_image"]["first"] == ["gone"] and probs["missing_image"]["count"] == 1
    assert probs["unreadable_image"]["count"] == 3
    assert probs["unreadable_image"]["first"] == ["trunc", "garbage", "big"]
    assert "exceeds the limit" in probs["unreadable_image"]["details"][2]
    assert probs["malformed_record"]["count"] == 1 and probs["malformed_record"]["first"] == ["line 9"]
    assert probs["empty_text"] == {"severity": "warning", "count": 1, "first": ["empty"], "details": [""]}
    assert probs["empty_title"]["first"] == ["notitle"]
    assert d["errors"] == 7 + 1 + 3 + 1 and d["warnings"] == 2 and not r.ok
    text = r.format()
    assert "ERROR duplicate_id: 7 (first: d0, d1, d2, d3, d4)" in text and text.rstrip().endswith("12 errors, 2 warnings")


def test_validate_clean_catalog_and_warnings_only(tmp_path):
    cat = synthetic_catalog(tmp_path / "c", n_notes=20)
    r = validate_catalog(cat)
    assert r.ok and r.n_errors == 0 and r.n_warnings == 0 and r.records == 20 and r.notes_with_image == 20
    p = _jsonl(tmp_path / "w.jsonl", [{"note_id": "a", "title": "", "content": ""}])
    r = validate_catalog(p)
    assert r.ok and r.n_warnings == 1  # empty texts alone do not fail the catalog


def test_validate_without_decoding_only_checks_existence(tmp_path):
    cat = _problem_catalog(tmp_path)
    r = validate_catalog(cat, check_images=False)
    assert "unreadable_image" not in r.problems and r.problems["missing_image"].count == 1


def _square(x):
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_ordered_imap_keeps_order_across_windows(workers):
    from notellm2.data_shards.catalog.notes import _maybe_pool, default_workers, ordered_imap

    items = list(range(23))
    with _maybe_pool(workers) as pool:
        assert list(ordered_imap(pool, _square, items, chunksize=2, window=5)) == [i * i for i in items]
        assert list(ordered_imap(pool, _square, [], window=5)) == []
    assert default_workers() >= 1


def test_validate_csv_catalog_reports_missing_image(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    write_plain_jpeg(imgs / "1.jpg", 8, 8)
    p = tmp_path / "notes.csv"
    p.write_text("n1,t,c,1,food\nn2,t,c,2,food\nn2,t,,,food\nbroken,row\n", encoding="utf-8")
    d = validate_catalog(str(p), image_root=str(imgs), workers=None).to_dict()
    assert d["problems"]["missing_image"]["first"] == ["n2"]
    assert d["problems"]["duplicate_id"]["first"] == ["n2"] and d["problems"]["empty_content"]["first"] == ["n2"]
    assert d["problems"]["malformed_record"]["first"] == ["line 4"] and d["errors"] == 3


def test_byte_order_mark_is_ignored(tmp_path):
    j = tmp_path / "bom.jsonl"
    j.write_bytes("\ufeff".encode() + b'{"note_id": "a", "title": "t", "content": "c"}\n')
    assert [n.note_id for n in load_catalog(str(j))] == ["a"]
    c = tmp_path / "bom.csv"
    c.write_bytes("\ufeff".encode() + b"note_id,title,content,image_id,category\nn1,t,c,,food\n")
    assert [n.note_id for n in load_catalog(str(c))] == ["n1"]


def test_non_utf8_input_names_file_and_line(tmp_path):
    j = tmp_path / "latin.jsonl"
    j.write_bytes(b'{"note_id": "a", "title": "t", "content": "c"}\n{"note_id": "b", "title": "caf\xe9", "content": "c"}\n')
    with pytest.raises(CatalogError, match=rf"{j}:2: not UTF-8 text"):
        load_catalog(str(j))
    r = validate_catalog(str(j))  # validate goes on past the bad line
    assert r.records == 2 and r.problems["malformed_record"].first == ["line 2"]
    c = tmp_path / "latin.csv"
    c.write_bytes(b"n1,t,c,,food\nn2,caf\xe9,c,,food\n")
    with pytest.raises(CatalogError, match=rf"{c}:\d: not UTF-8 text"):
        load_catalog(str(c))
