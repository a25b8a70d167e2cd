"""Notes with no text at all (picture-only posts: the benchmark's `--blank-text-fraction`, docs/benchmark.md)
are legal everywhere: the catalog reader and `data validate` (a warning), shard writing, the streaming
reader with the real prompter, a training step, `notellm2 embed` and the serving encoder. One of them also
has no image: a note with nothing to show still gets a prompt and a vector."""
from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
import torch

from notellm2.data_shards.catalog.shaping import blank_text
from notellm2.data_shards.catalog.synthetic import make_synthetic_catalog, make_synthetic_pairs
from notellm2.data_shards.ids import note_id_hash

GAP = 1e-5  # embed vs NoteEncoder, same device and dtype (tests/launcher/eval/test_serving.py)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models of width 32: threads only cost here (on a loaded machine 10x: 120 s at 2 threads, 8 s at 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from notellm2.data_shards.writing.shards import ShardSettings, write_shards

    root = tmp_path_factory.mktemp("empty-text")
    cat = make_synthetic_catalog(str(root / "catalog"), n_notes=24, n_categories=3, seed=0)
    notes = [json.loads(line) for line in open(cat)]
    blank_text(notes, 0.5, seed=0)
    blank = [n["note_id"] for n in notes if not n["title"]]
    assert len(blank) >= 6
    nothing = blank[0]  # no text and no image either
    for n in notes:
        if n["note_id"] == nothing:
            n["image"] = None
    with open(cat, "w") as fh:
        fh.writelines(json.dumps(n) + "\n" for n in notes)
    # pairs of two empty notes, and empty with full, in train and test
    full = [n["note_id"] for n in notes if n["title"]]
    extra = [(blank[0], blank[1], 1.0, "train"), (blank[2], blank[3], 1.0, "train"), (blank[1], full[0], 1.0, "train"),
             (blank[4], blank[5], 1.0, "test"), (blank[0], full[1], 1.0, "test")]
    pairs = make_synthetic_pairs(cat, str(root / "pairs"), n_pairs=30, split_fractions=(0.6, 0.0, 0.4), seed=0,
                                 extra_rows=extra)
    shards = str(root / "shards")
    manifest = write_shards(pairs, cat, shards, settings=ShardSettings(shard_size=8, image_size=32, seed=0,
                                                                      splits=("train", "test")), workers=1)
    return {"root": root, "catalog": cat, "blank": blank, "nothing": nothing, "shards": shards, "manifest": manifest}


def _model_cfg(tiny):
    """A notellm2 model on the session's tiny llama and CLIP (tests/conftest.py)."""
    from notellm2.launcher.config import config_from_dict

    return config_from_dict({"model": {
        "variant": "notellm2", "llm": {"path": tiny["llama"], "attn_implementation": "sdpa"},
        "vision": {"kind": "hf", "path": tiny["clip"], "image_size": 32},
        "connector": {"kind": "qformer", "num_query_tokens": 2, "num_layers": 1, "hidden_size": 32, "num_heads": 2},
        "max_text_tokens": 16, "embed_dim": 8}})


def _shard_notes(shards: str, prefix: str) -> dict:
    """note_id -> (its JSON member, its image bytes or None) over the shards named prefix*."""
    out = {}
    for name in sorted(os.listdir(shards)):
        if not (name.startswith(prefix) and name.endswith(".tar")):
            continue
        with tarfile.open(os.path.join(shards, name)) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for mname, member in members.items():
                if mname.endswith(".json") and not mname.endswith(".pair.json"):
                    note = json.loads(tar.extractfile(member).read())
                    img = members.get(mname[:-len("json")] + "jpg")
                    out[note["note_id"]] = (note, tar.extractfile(img).read() if img else None)
    return out


def test_the_catalog_reads_and_validates_with_a_warning(world):
    from notellm2.data_shards.catalog.notes import load_catalog, validate_catalog

    notes = {n.note_id: n for n in load_catalog(world["catalog"])}
    assert all(notes[i].title == notes[i].content == "" and notes[i].topics == [] for i in world["blank"])
    report = validate_catalog(world["catalog"], workers=1)
    assert report.ok and report.n_errors == 0
    assert report.problems["empty_text"].count == len(world["blank"])


def test_shards_carry_empty_notes_as_written(world):
    counts = world["manifest"]["counts"]
    assert counts["train"]["missing_note_pairs"] == counts["test"]["missing_note_pairs"] == 0
    written = {**_shard_notes(world["shards"], "notes-test-"), **_shard_notes(world["shards"], "pairs-train-")}
    for nid in world["blank"]:
        if nid in written:
            note, image = written[nid]
            assert (note["title"], note["topics"], note["content"]) == ("", [], "")
            assert (image is None) == (nid == world["nothing"])
    assert world["nothing"] in written and world["blank"][5] in written


@pytest.fixture(scope="module")
def trained(world, tiny):
    """The streaming reader with the real prompter in the loop, then the model's loss, its gradient and an
    optimizer step, for every batch of an epoch (the batches with empty notes included). Returns what the
    tests check and the trained model's config and weights."""
    from notellm2.data_shards.batch import to_device
    from notellm2.data_shards.config import DataConfig
    from notellm2.data_shards.reader import PairLoader
    from notellm2.modeling.encoder import build_all
    from notellm2.modeling.vision import encode_images

    cfg = _model_cfg(tiny)
    torch.manual_seed(0)
    model, tower, prompter = build_all(cfg.model, cfg.loss)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = PairLoader(os.path.join(world["shards"], "pairs-train-*.tar"), data_cfg=DataConfig(num_workers=0, shuffle_buffer=4),
                        encode_fn=prompter.encode, collate_text_fn=prompter.collate, rank=0, world_size=1,
                        pairs_per_rank=4, image_size=32)
    blank = {note_id_hash(i): i for i in world["blank"]}
    empty_prompt = {has: prompter.encode({"note_id": "x", "title": "", "topics": [], "content": "", "has_image": has})["input_ids"]
                    for has in (True, False)}
    seen = {"rows": [], "losses": [], "grads_finite": [], "head_moved": []}
    for batch in loader:
        for row, h in enumerate(batch["note_ids"].tolist()):
            if h in blank:
                ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
                seen["rows"].append((blank[h], ids == empty_prompt[bool(batch["image_present"][row])]))
        before = [p.detach().clone() for p in model.head.parameters()]
        batch = to_device(batch, "cpu")
        tokens, pooled = encode_images(tower, batch)
        out = model(batch, tokens, pooled)
        seen["losses"].append(out["loss"].item())
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen["grads_finite"].append(bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads))
        opt.step()
        seen["head_moved"].append(any(not torch.equal(a, b) for a, b in zip(before, model.head.parameters())))
    return {"seen": seen, "cfg": cfg, "state": model.state_dict()}


def test_a_training_step_on_pairs_of_empty_notes(world, trained):
    seen = trained["seen"]
    rows = seen["rows"]
    assert len(rows) >= 6 and world["nothing"] in {nid for nid, _ in rows}
    assert all(same for _, same in rows), rows  # an empty note's prompt is the template with empty fields
    assert seen["losses"] and all(np.isfinite(seen["losses"]))
    assert all(seen["grads_finite"]) and all(seen["head_moved"])


def test_embed_and_the_serving_encoder_give_empty_notes_the_same_vector(world, trained, tmp_path):
    from notellm2.launcher.eval.embed import embed_command
    from notellm2.launcher.eval.evaluate import load_embeddings
    from notellm2.launcher.export import write_export
    from notellm2.modeling.pretrained import NoteEncoder

    cfg, state = trained["cfg"], trained["state"]
    export = str(tmp_path / "export")
    write_export(state, cfg, export, source={"step": 1, "note": "empty-text test"})
    pattern = os.path.join(world["shards"], "notes-test-*.tar")
    assert embed_command(export, None, None, pattern, str(tmp_path / "emb"), batch_size=3, num_workers=0) == 0
    ids, emb = load_embeddings(str(tmp_path / "emb"))
    cli = dict(zip(ids, emb.numpy()))
    shard = _shard_notes(world["shards"], "notes-test-")
    wanted = [i for i in world["blank"] if i in shard]
    assert len(wanted) >= 2 and world["nothing"] in wanted
    notes = []
    for nid in wanted:
        note, image = shard[nid]
        path = None
        if image is not None:
            path = str(tmp_path / f"{nid}.jpg")
            open(path, "wb").write(image)
        notes.append({**note, "image": path})
    vectors = NoteEncoder.from_pretrained(export).encode(notes, batch_size=2)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    diff = max(float(np.abs(v - cli[n["note_id"]]).max()) for n, v in zip(notes, vectors))
    assert diff <= GAP, diff
    with_image = [v for n, v in zip(notes, vectors) if n["image"]]
    assert len(with_image) >= 2 and np.abs(with_image[0] - with_image[1]).max() > 1e-4  # the image tells them apart
