"""The serving encoder (`notellm2.modeling.pretrained.NoteEncoder`): an export loads and embeds raw notes with
no DeepSpeed import, gives back the reference vectors stored at export time, and embeds a note
exactly as `notellm2 embed` does from the shards."""
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from notellm2.launcher.config import config_from_dict
from notellm2.launcher.eval.evaluate import load_embeddings
from tests.helpers.models import make_tiny_clip_dir, make_tiny_llm_dir
from tests.helpers.data import synthetic_shards
from tests.helpers.multirank import REPO, base_env

GAP = 1e-5  # same device and dtype


def tiny_export(root, variant="notellm2"):
    """An export of an untrained tiny model, written by the exporter's own `write_export`."""
    from notellm2.launcher.export import write_export
    from notellm2.modeling.encoder import build_all

    llm = make_tiny_llm_dir(str(root), arch="llama", num_layers=2, hidden=32)
    clip = make_tiny_clip_dir(str(root), hidden=32, layers=1)
    cfg = config_from_dict({"model": {
        "variant": variant, "llm": {"path": llm, "attn_implementation": "sdpa"},
        "vision": {"kind": "hf", "path": clip, "image_size": 32},
        "connector": {"kind": "qformer", "num_query_tokens": 2, "num_layers": 1, "hidden_size": 32, "num_heads": 2},
        "max_text_tokens": 16, "embed_dim": 8}})
    torch.manual_seed(0)
    note_model, _, _ = build_all(cfg.model, cfg.loss)
    with torch.no_grad():  # a head far from its init, so that the vectors differ clearly between notes
        for p in note_model.head.parameters():
            p.normal_(0.0, 1.0)
    out = str(root / f"export-{variant}")
    write_export(note_model.state_dict(), cfg, out, source={"step": 0, "note": "untrained test model"})
    return out


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("serving"))


def _fresh(code: str, timeout=300) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO,
                         env=base_env(), timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_export_holds_reference_vectors_of_fixed_notes(export_dir):
    ref = json.load(open(os.path.join(export_dir, "reference_notes.json")))
    stored = np.load(os.path.join(export_dir, "reference_embeddings.npz"))
    assert set(stored.files) == {"both", "text", "image"} == set(ref["modes"])
    assert (ref["device"], ref["dtype"]) == ("cpu", "float32")
    assert len(ref["modes"]["both"]) == 3 and len(ref["modes"]["image"]) == 2  # one reference note has no image
    for mode in stored.files:
        np.testing.assert_allclose(np.linalg.norm(stored[mode], axis=1), 1.0, atol=1e-5)
    # the probes are different functions of the note, and different notes get different vectors
    assert np.abs(stored["both"][:2] - stored["text"][:2]).max() > 1e-2
    assert np.abs(stored["both"][0] - stored["both"][1]).max() > 1e-2


def test_a_fresh_interpreter_reloads_the_export_without_deepspeed_and_matches_the_reference(export_dir):
    got = _fresh(f"""
        import json, sys
        from notellm2.modeling.pretrained import NoteEncoder
        enc = NoteEncoder.from_pretrained({export_dir!r})
        gaps = enc.reference_gap()
        vec = enc.encode([{{"title": "coffee", "topics": ["city"], "content": "night", "image": None}}])
        print(json.dumps({{"gaps": gaps, "shape": list(vec.shape), "dtype": str(vec.dtype),
                           "deepspeed": "deepspeed" in sys.modules,
                           "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "webdataset"))}}))
    """)
    assert got["deepspeed"] is False and got["heavy"] == [], got["heavy"]
    assert got["shape"] == [1, 8] and got["dtype"] == "float32"
    assert set(got["gaps"]) == {"both", "text", "image"}
    assert max(got["gaps"].values()) <= GAP, got["gaps"]


def test_a_changed_weight_shows_in_the_reference_gap(export_dir, tmp_path):
    """The check can fail: an export whose head weights were altered no longer matches its reference
    (refused by the file hashes as it is; past them when the hashes are listed again)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from notellm2.modeling.pretrained import ExportError, NoteEncoder
    from tests.helpers.tamper import reseal_export

    copy = str(tmp_path / "altered")
    shutil.copytree(export_dir, copy)
    state = load_file(os.path.join(copy, "model.safetensors"))
    key = next(k for k in state if k.startswith("head.") and k.endswith("weight"))
    state[key] = state[key] + 0.05
    save_file(state, os.path.join(copy, "model.safetensors"))
    with pytest.raises(ExportError, match="model.safetensors: its SHA-256 differs"):
        NoteEncoder.from_pretrained(copy)
    reseal_export(copy)
    gaps = NoteEncoder.from_pretrained(copy).reference_gap()
    assert min(gaps.values()) > 1e-3, gaps


def test_encode_is_independent_of_batching_and_of_how_the_image_is_given(export_dir, tmp_path):
    from notellm2.modeling.pretrained import NoteEncoder

    enc = NoteEncoder.from_pretrained(export_dir)
    rng = np.random.default_rng(0)
    notes = []
    for i in range(5):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)).save(path)
        notes.append({"note_id": f"n{i}", "title": f"title {i} garden", "topics": ["summer", "beach"][: i % 3],
                      "content": "the quick brown fox " * i, "image": str(path) if i != 3 else None})
    one = np.concatenate([enc.encode([n], batch_size=1) for n in notes])
    batched = enc.encode(notes, batch_size=4)
    assert batched.shape == (5, 8) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(batched, one, atol=GAP)
    as_pil = [dict(n, image=Image.open(n["image"])) if n["image"] else n for n in notes]
    np.testing.assert_allclose(enc.encode(as_pil, batch_size=3), batched, atol=GAP)
    # the image matters for `both` and is the whole input of `image`
    no_image = [dict(n, image=None) for n in notes]
    assert np.abs(enc.encode(no_image)[[0, 1, 2, 4]] - batched[[0, 1, 2, 4]]).max() > 1e-3
    with_image = [n for n in notes if n["image"]]
    img = enc.encode(with_image, mode="image")
    other_text = enc.encode([dict(n, title="other", content="words", topics=[]) for n in with_image], mode="image")
    np.testing.assert_allclose(img, other_text, atol=GAP)
    text = enc.encode(notes, mode="text")
    np.testing.assert_allclose(text, enc.encode(no_image, mode="text"), atol=GAP)


def test_bad_notes_are_one_line_errors_naming_the_note(export_dir, tmp_path):
    from notellm2.modeling.pretrained import NoteEncoder, NoteInputError

    enc = NoteEncoder.from_pretrained(export_dir)
    good = {"title": "a", "topics": [], "content": "b", "image": None}
    with pytest.raises(NoteInputError, match=r"note 1 \(x\): has no image; the image probe"):
        enc.encode([dict(good, image=os.path.join(export_dir, "reference", "disc.png")), dict(good, note_id="x")],
                   mode="image")
    with pytest.raises(NoteInputError, match=r"note 0: image .*nope\.png"):
        enc.encode([dict(good, image=str(tmp_path / "nope.png"))])
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    with pytest.raises(NoteInputError, match=r"note 0: image .*garbage\.png: undecodable image"):
        enc.encode([dict(good, image=str(tmp_path / "garbage.png"))])
    with pytest.raises(NoteInputError, match=r"mode 'pixels'"):
        enc.encode([good], mode="pixels")


def test_serving_gives_the_vectors_of_notellm2_embed(export_dir, tmp_path):
    """Notes read back from the notes shards (their JPEG bytes as image files) embed through
    NoteEncoder.encode exactly as `notellm2 embed --model EXPORT` embeds the shards."""
    from notellm2.modeling.pretrained import NoteEncoder

    shard_dir, _ = synthetic_shards(str(tmp_path / "data"), n_notes=14, n_categories=2, n_pairs=16, shard_size=5,
                                    image_size=32, splits=("test",))
    pattern = os.path.join(shard_dir, "notes-test-*.tar")
    out = subprocess.run([sys.executable, "-m", "notellm2.launcher", "embed", "--model", export_dir, "--shards", pattern,
                          "--out", str(tmp_path / "emb"), "--batch-size", "4", "--num-workers", "0"],
                         capture_output=True, text=True, cwd=REPO, env=base_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ids, emb = load_embeddings(str(tmp_path / "emb"))
    cli = dict(zip(ids, emb.numpy()))

    notes = []
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(os.listdir(shard_dir)):
        if not (path.startswith("notes-test-") and path.endswith(".tar")):
            continue
        with tarfile.open(os.path.join(shard_dir, path)) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if name.endswith(".json"):
                    note = json.loads(tar.extractfile(member).read())
                    key = name[: -len(".json")]
                    img = next((members[key + ext] for ext in (".jpg", ".png", ".jpeg") if key + ext in members), None)
                    image = None
                    if img is not None:
                        image = str(images / os.path.basename(img.name))
                        with open(image, "wb") as fh:
                            fh.write(tar.extractfile(img).read())
                    notes.append({**note, "image": image})
    assert sorted(n["note_id"] for n in notes) == sorted(cli) and any(n["image"] for n in notes)
    vectors = NoteEncoder.from_pretrained(export_dir).encode(notes, batch_size=3)
    diff = max(float(np.abs(v - cli[n["note_id"]]).max()) for n, v in zip(notes, vectors))
    assert diff <= GAP, diff


def test_a_bf16_load_stays_within_cosine_0999_of_the_fp32_reference(export_dir):
    from notellm2.modeling.pretrained import REFERENCE_NOTES, NoteEncoder, _resolve_images

    ref = json.load(open(os.path.join(export_dir, REFERENCE_NOTES)))
    stored = np.load(os.path.join(export_dir, "reference_embeddings.npz"))
    by_id = {n["note_id"]: n for n in ref["notes"]}
    enc = NoteEncoder.from_pretrained(export_dir, dtype=torch.bfloat16)
    assert next(enc.note_model.llm.parameters()).dtype == torch.bfloat16
    for mode, ids in ref["modes"].items():
        vectors = enc.encode(_resolve_images([by_id[i] for i in ids], export_dir), mode=mode)
        assert vectors.dtype == np.float32
        cos = (vectors * stored[mode]).sum(axis=1)
        assert cos.min() >= 0.999, (mode, cos)
        assert np.abs(vectors - stored[mode]).max() > 0  # it did run in bf16
