"""New notes in without pairs (`data write-notes`), embedding sets that know where they came from, and
delta embedding (`embed --base`): the delta set equals a full re-embed of the new catalog (docs/new_notes.md)."""
import json
import os
import shutil

import numpy as np
import pytest

from notellm2.launcher.cli import main
from notellm2.launcher.eval.evaluate import load_embeddings
from tests.helpers.data import synthetic_catalog
from tests.helpers.embed_setup import tiny_embed_setup


def read_catalog(path):
    return [json.loads(line) for line in open(path)]


def write_catalog(path, notes):
    with open(path, "w") as fh:
        fh.writelines(json.dumps(n) + "\n" for n in notes)
    return str(path)


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    """Day 1: 16 notes (n3 re-posts n2's text and image). Day 2: n4, n5 deleted; n6 edited (n20's text), n7
    edited (n8's image); four new notes. Catalogs share the images folder."""
    root = tmp_path_factory.mktemp("delta")
    setup = tiny_embed_setup(root / "model")
    cat = synthetic_catalog(root / "cat", n_notes=22, n_categories=3, image_size=32, image_fraction=0.8)
    notes = read_catalog(cat)
    notes[3].update({k: notes[2][k] for k in ("title", "content", "topics", "image")})
    day1 = notes[:16]
    edited = [dict(notes[6], title=notes[20]["title"], content=notes[20]["content"], topics=notes[20]["topics"]),
              dict(notes[7], image=notes[8]["image"])]
    new = notes[16:20]
    day2 = [n for n in day1 if n["note_id"] not in ("n000004", "n000005", "n000006", "n000007")] + edited + new
    folder = os.path.dirname(cat)
    paths = {"day1": write_catalog(os.path.join(folder, "day1.jsonl"), day1),
             "day2": write_catalog(os.path.join(folder, "day2.jsonl"), day2),
             "changes": write_catalog(os.path.join(folder, "changes.jsonl"), edited + new)}
    (root / "deleted.txt").write_text("# deleted today\nn000004\nn000005\n")
    return {"root": root, "setup": setup, **paths, "deleted": str(root / "deleted.txt")}


def embed(days, out, *extra):
    return main(["embed", "--config", days["setup"]["config"], "--out", str(out), "--batch-size", "4", *extra])


def write_notes(catalog, out, *extra):
    return main(["data", "write-notes", "--catalog", catalog, "--out", str(out), "--image-size", "32",
                 "--workers", "1", "--no-progress", *extra])


def test_write_notes_takes_a_catalog_without_pairs_and_refuses_contradictions(days, tmp_path, capsys):
    assert write_notes(days["changes"], tmp_path / "n", "--deleted", days["deleted"]) == 0
    out = capsys.readouterr().out
    assert "notes: 6 written" in out and "2 deleted ids" in out
    manifest = json.load(open(tmp_path / "n" / "manifest.json"))
    assert manifest["format"] == "notellm2-notes" and manifest["deletions"]["kind"] == "list"
    assert open(tmp_path / "n" / "deleted.txt").read() == "n000004\nn000005\n"
    assert [e["name"] for e in manifest["shards"]] == ["notes-catalog-000000.tar"]
    from notellm2.data_shards.reader.content_hash import shard_content_hashes

    ids, hashes = shard_content_hashes(str(tmp_path / "n" / "notes-catalog-*.tar"))
    assert ids == sorted(ids) and len(ids) == 6 and hashes.shape == (6, 16)

    (tmp_path / "bad.txt").write_text("n000016\n")  # a new note of the catalog cannot also be deleted
    assert write_notes(days["changes"], tmp_path / "m", "--deleted", str(tmp_path / "bad.txt")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.txt: 1 deleted ids are also notes of" in err and "n000016" in err
    assert write_notes(days["changes"], tmp_path / "m", "--full-catalog", days["day1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "notes of" in err and "are not in the full catalog" in err
    assert write_notes(days["changes"], tmp_path / "m", "--deleted", days["deleted"], "--full-catalog",
                       days["day2"]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_delta_embedding_equals_a_full_re_embed_and_reuses_the_rest_bit_for_bit(days, tmp_path, capsys):
    root = days["root"]
    assert write_notes(days["day1"], tmp_path / "notes1") == 0
    assert embed(days, tmp_path / "emb1", "--shards", str(tmp_path / "notes1")) == 0
    info = json.load(open(tmp_path / "emb1" / "embeddings.json"))
    assert info["fingerprint"].startswith("untrained-config-sha256:") and info["mode"] == "both"
    ids1, emb1 = load_embeddings(str(tmp_path / "emb1"))
    hashes1 = np.load(tmp_path / "emb1" / "content_hashes.npy")
    assert hashes1.shape == (16, 16) and info["content_hashes"]["file"] == "content_hashes.npy"
    h = {n: bytes(r) for n, r in zip(ids1, hashes1)}
    assert h["n000002"] == h["n000003"] and len(set(h.values())) == 15  # the re-post shares its hash

    assert write_notes(days["changes"], tmp_path / "notes2", "--deleted", days["deleted"]) == 0
    capsys.readouterr()
    assert embed(days, tmp_path / "emb2", "--shards", str(tmp_path / "notes2"), "--base", str(tmp_path / "emb1")) == 0
    log = capsys.readouterr().out
    assert "embed --base: 18 notes: 12 reused from" in log and "6 embedded (4 new, 2 changed), 2 dropped" in log, log
    assert not (tmp_path / "emb2" / ".delta").exists()
    ids2, emb2 = load_embeddings(str(tmp_path / "emb2"))
    delta = json.load(open(tmp_path / "emb2" / "embeddings.json"))["delta"]
    assert delta["reused"] == 12 and delta["embedded"] == 6 and delta["dropped"] == 2

    # the full re-embed of day 2's whole catalog
    assert write_notes(days["day2"], tmp_path / "notes2full") == 0
    assert embed(days, tmp_path / "full2", "--shards", str(tmp_path / "notes2full")) == 0
    ids_f, emb_f = load_embeddings(str(tmp_path / "full2"))
    assert sorted(ids2) == sorted(ids_f) == sorted(n["note_id"] for n in read_catalog(days["day2"]))
    pos = {n: i for i, n in enumerate(ids_f)}
    order = [pos[n] for n in ids2]
    assert float((emb2 - emb_f[order]).abs().max()) < 1e-5
    hashes_f = np.load(tmp_path / "full2" / "content_hashes.npy")
    assert np.array_equal(np.load(tmp_path / "emb2" / "content_hashes.npy"), hashes_f[order])
    # reused rows are the base's vectors bit for bit; the edited notes' vectors moved
    pos1 = {n: i for i, n in enumerate(ids1)}
    kept = [n for n in ids2 if n in pos1 and n not in ("n000006", "n000007")]
    assert len(kept) == 12 and np.array_equal(emb2[[ids2.index(n) for n in kept]].numpy(),
                                              emb1[[pos1[n] for n in kept]].numpy())
    moved = [float((emb2[ids2.index(n)] - emb1[pos1[n]]).abs().max()) for n in ("n000006", "n000007")]
    assert min(moved) > 1e-4, moved

    # deletions as the difference against today's full catalog: the same set, bit for bit
    assert write_notes(days["changes"], tmp_path / "notes2b", "--full-catalog", days["day2"]) == 0
    assert embed(days, tmp_path / "emb2b", "--shards", str(tmp_path / "notes2b"), "--base", str(tmp_path / "emb1")) == 0
    ids2b, emb2b = load_embeddings(str(tmp_path / "emb2b"))
    assert ids2b == ids2 and np.array_equal(emb2b.numpy(), emb2.numpy())

    # nothing changed: nothing is embedded and the model is not even loaded
    assert write_notes(days["changes"], tmp_path / "same", "--deleted", str(root / "none.txt")) == 2  # no such file
    (root / "none.txt").write_text("")
    assert write_notes(days["changes"], tmp_path / "same", "--deleted", str(root / "none.txt")) == 0
    capsys.readouterr()
    assert embed(days, tmp_path / "emb3", "--shards", str(tmp_path / "same"), "--base", str(tmp_path / "emb2")) == 0
    assert "0 embedded (0 new, 0 changed), 0 dropped" in capsys.readouterr().out
    ids3, emb3 = load_embeddings(str(tmp_path / "emb3"))
    assert ids3 == ids2 and np.array_equal(emb3.numpy(), emb2.numpy())


def test_vectors_of_another_model_or_mode_are_refused_in_one_line(days, tmp_path, capsys):
    from notellm2.launcher.eval.evaluate import save_embeddings
    from notellm2.launcher.eval.provenance import write_content_hashes

    assert write_notes(days["changes"], tmp_path / "notes") == 0
    ids = ["n000000", "n000001"]
    meta = {"mode": "both", "fingerprint": "files-sha256:" + "ab" * 32,
            **write_content_hashes(str(tmp_path / "other"), np.zeros((2, 16), np.uint8))}
    save_embeddings(str(tmp_path / "other"), ids, np.eye(2, 8, dtype=np.float32), meta)
    capsys.readouterr()
    assert embed(days, tmp_path / "out", "--shards", str(tmp_path / "notes"), "--base", str(tmp_path / "other")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model fingerprint untrained-config-sha256:" in err, err
    assert "has files-sha256:abababababab" in err and "cannot be mixed" in err, err
    from notellm2.launcher.config import load_config
    from notellm2.launcher.eval.provenance import untrained_fingerprint

    same = {**meta, "fingerprint": untrained_fingerprint(load_config(days["setup"]["config"], []))}
    save_embeddings(str(tmp_path / "other"), ids, np.eye(2, 8, dtype=np.float32), same)
    assert embed(days, tmp_path / "out", "--shards", str(tmp_path / "notes"), "--base", str(tmp_path / "other"),
                 "--mode", "text") == 2
    assert "holds --mode text vectors but --base" in capsys.readouterr().err
    shutil.copytree(tmp_path / "other", tmp_path / "old")
    os.remove(tmp_path / "old" / "content_hashes.npy")  # a set from before provenance
    info = json.load(open(tmp_path / "old" / "embeddings.json"))
    del info["content_hashes"]
    json.dump(info, open(tmp_path / "old" / "embeddings.json", "w"))
    assert embed(days, tmp_path / "out", "--shards", str(tmp_path / "notes"), "--base", str(tmp_path / "old")) == 2
    assert "no fingerprint or content hashes" in capsys.readouterr().err
    assert embed(days, tmp_path / "other", "--shards", str(tmp_path / "notes"), "--base", str(tmp_path / "other")) == 2
    assert "is the --base set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
