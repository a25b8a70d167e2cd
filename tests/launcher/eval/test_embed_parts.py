"""`notellm2 embed` at catalog scale: parts every N batches per rank, resume after kill -9, --device,
--dtype float16, deterministic output (docs/evaluation.md, "notellm2 embed")."""
import json
import os

import numpy as np
import pytest
import torch

from notellm2.launcher.cli import main
from notellm2.launcher.eval.evaluate import EmbeddingsError, load_embeddings, recall_at_k, save_embeddings
from tests.helpers.embed_setup import tiny_embed_setup
from tests.helpers.multirank import run_command

FILES = ("embeddings.npy", "ids.txt", "embeddings.json")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_embed_setup(tmp_path_factory.mktemp("embed-parts"))


def embed(setup, out, *extra) -> int:
    return main(["embed", "--config", setup["config"], "--out", str(out), "--batch-size", "4", *extra])


def read_bytes(folder) -> dict:
    return {name: open(os.path.join(folder, name), "rb").read() for name in FILES}


# ----------------------------------------------------------------------------- the CLI's mirrors, device choice

def test_cli_choices_mirror_the_library():
    from notellm2.launcher.cli import embed as cli
    from notellm2.launcher.eval.embed import DEFAULT_PART_EVERY, EMBED_DEVICES
    from notellm2.launcher.eval.evaluate import EMBEDDING_DTYPES

    assert cli.DEFAULT_PART_EVERY == DEFAULT_PART_EVERY and cli.DEVICES == EMBED_DEVICES
    assert cli.DTYPES == EMBEDDING_DTYPES


def test_embed_device_is_the_ranks_gpu_or_a_one_line_refusal():
    from notellm2.launcher.distributed import detect_topology
    from notellm2.launcher.eval.embed import embed_device
    from notellm2.errors import UserError

    topo = detect_topology({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"})
    assert embed_device(topo, "cpu", cuda_available=False) == torch.device("cpu")
    assert embed_device(topo, "cuda", cuda_available=True, cuda_count=2) == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"^--device cuda: no CUDA device here") as e:
        embed_device(topo, "cuda", cuda_available=False)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="local rank 1 has no GPU \\(this node has 1\\)"):
        embed_device(topo, "cuda", cuda_available=True, cuda_count=1)
    with pytest.raises(UserError, match="--device tpu: allowed cpu, cuda"):
        embed_device(topo, "tpu")


def test_device_cuda_without_cuda_exits_2_before_any_model_loads(setup, tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import notellm2.launcher.eval.embed as embed_mod

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(embed_mod, "load_embedder", no_model)
    assert embed(setup, tmp_path / "out", "--device", "cuda") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--device cuda: no CUDA device here" in err and "--device cpu" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [(["--part-every", "0"], "argument --part-every: 0: must be an integer >= 1"),
                                          (["--dtype", "bfloat16"], "--dtype: invalid choice"),
                                          (["--device", "tpu"], "--device: invalid choice")])
def test_bad_options_are_refused_by_the_parser(setup, tmp_path, args, message, capsys):
    assert embed(setup, tmp_path / "out", *args) == 2  # the parser's one line (notellm2.launcher.cli.Parser)
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- the loader's skip

def test_notes_loader_skip_batches_gives_the_same_later_batches_and_decodes_none_before(setup, monkeypatch):
    from notellm2.data_shards.reader import notes_loader
    from notellm2.data_shards.config import DataConfig
    from notellm2.data_shards.reader import NotesLoader
    from tests.helpers.shards import CharCollate, CharEncoder

    def loader(skip, rank=1, workers=0):
        return NotesLoader(setup["shards"], DataConfig(num_workers=workers), CharEncoder(), CharCollate(), rank=rank,
                           world_size=2, batch_size=2, image_size=32, skip_batches=skip)

    full = list(loader(0))
    assert len(full) == loader(0).total_batches == 4
    from_workers = list(loader(1, workers=2))  # the workers' round-robin starts at the first unskipped batch
    assert [b["note_id_strs"] for b in from_workers] == [b["note_id_strs"] for b in full[1:]]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(from_workers, full[1:]))
    reads = []
    real = notes_loader._NotesSource.load_note
    monkeypatch.setattr(notes_loader._NotesSource, "load_note",
                        lambda self, files, path, sample, rec, where: reads.append(where) or real(self, files, path,
                                                                                                 sample, rec, where))
    tail = loader(3)
    assert len(tail) == 1 and tail.total_batches == 4
    got = list(tail)
    # only the last batch's notes are read (15 notes: one note and a padding row), none of the 3 skipped batches'
    assert len(got) == 1 and len(reads) == int((~full[3]["is_dummy"]).sum()) == 1
    for key in ("input_ids", "pixel_values", "is_dummy"):
        assert torch.equal(got[0][key], full[3][key]), key
    assert got[0]["note_id_strs"] == full[3]["note_id_strs"]
    assert list(loader(4)) == []
    with pytest.raises(ValueError, match="skip_batches 5 is not in \\[0, 4\\]"):
        loader(5)


# ----------------------------------------------------------------------------- one process: parts, determinism, dtype

def test_parts_give_identical_files_run_to_run_and_float16_halves_the_vectors(setup, tmp_path):
    # 15 notes, batch 4: 4 batches; a part every 3 batches -> 2 parts (the last one short)
    assert embed(setup, tmp_path / "a", "--part-every", "3") == 0
    assert embed(setup, tmp_path / "b", "--part-every", "3") == 0
    assert read_bytes(tmp_path / "a") == read_bytes(tmp_path / "b")  # deterministic, every file
    assert not (tmp_path / "a" / "parts").exists()  # removed once the final files are written
    ids, emb = load_embeddings(str(tmp_path / "a"))
    assert len(ids) == setup["notes"] == len(set(ids))
    meta = json.load(open(tmp_path / "a" / "embeddings.json"))
    assert meta["dtype"] == "float32" and meta["count"] == setup["notes"]

    assert embed(setup, tmp_path / "h", "--part-every", "100", "--dtype", "float16") == 0
    raw = np.load(tmp_path / "h" / "embeddings.npy")
    assert raw.dtype == np.float16 and json.load(open(tmp_path / "h" / "embeddings.json"))["dtype"] == "float16"
    ids16, emb16 = load_embeddings(str(tmp_path / "h"))
    assert ids16 == ids and emb16.dtype == torch.float32  # upcast on read
    assert np.array_equal(emb16.numpy(), emb.numpy().astype(np.float16).astype(np.float32))  # only storage differs
    header = 128  # the .npy header of a 2-D array
    size32, size16 = (os.path.getsize(tmp_path / d / "embeddings.npy") for d in ("a", "h"))
    assert (size16 - header) * 2 == size32 - header


def test_other_settings_are_refused_and_restart_discards_the_parts(setup, tmp_path, capsys):
    from notellm2.launcher.config import load_config
    from notellm2.launcher.eval.embed import PARTS_DIR, parts_fingerprint, write_part

    out = tmp_path / "out"
    parts = out / PARTS_DIR
    parts.mkdir(parents=True)
    cfg = load_config(setup["config"], [])
    fp = parts_fingerprint(None, cfg, setup["shards"], "both", 1, 8, 20, cfg.data)  # batch size 8, not 4
    (parts / "manifest.json").write_text(json.dumps({"fingerprint": fp}))
    write_part(str(parts / "rank00000-00000.npz"), ["x"], np.ones((1, 8), np.float32), 0, (0, 20))
    assert embed(setup, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(parts) in err and "batch_size 8 there, 4 now" in err and "--restart" in err, err

    (parts / "manifest.json").write_text("{not json")
    assert embed(setup, out) == 2
    assert "manifest.json: not a readable parts manifest" in capsys.readouterr().err

    # the same settings but a part that is not one: named in one line
    fp = parts_fingerprint(None, cfg, setup["shards"], "both", 1, 4, 20, cfg.data)
    (parts / "manifest.json").write_text(json.dumps({"fingerprint": fp}))
    (parts / "rank00000-00000.npz").write_bytes(b"not a zip")
    assert embed(setup, out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # found once the model is loaded (its bars above)
    assert err.startswith("notellm2 embed: ") and "rank00000-00000.npz: not a readable embed part" in err, err

    assert embed(setup, out, "--restart") == 0
    ids, _ = load_embeddings(str(out))
    assert len(ids) == setup["notes"] and not parts.exists()


# ----------------------------------------------------------------------------- float16 downstream

def test_float16_file_is_half_the_size_and_eval_and_neighbors_read_it(tmp_path):
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(4000, 64)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    ids = [f"n{i}" for i in range(len(vec))]
    save_embeddings(str(tmp_path / "f32"), ids, vec)
    save_embeddings(str(tmp_path / "f16"), ids, vec, dtype="float16")
    ratio = os.path.getsize(tmp_path / "f16" / "embeddings.npy") / os.path.getsize(tmp_path / "f32" / "embeddings.npy")
    assert 0.5 <= ratio < 0.501, ratio
    ids32, emb32 = load_embeddings(str(tmp_path / "f32"))
    ids16, emb16 = load_embeddings(str(tmp_path / "f16"))
    assert ids16 == ids32 and emb16.dtype == torch.float32
    assert float((emb16 - emb32).abs().max()) < 1e-3
    # recall on a hand-built set: each query's target is a noisy copy of it
    queries = ids[:200]
    targets = [f"n{i}" for i in range(200, 400)]
    noisy = vec[:200] + 2.0 * rng.normal(size=(200, 64)).astype(np.float32) / 8
    vec2 = vec.copy()
    vec2[200:400] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    save_embeddings(str(tmp_path / "g32"), ids, vec2)
    save_embeddings(str(tmp_path / "g16"), ids, vec2, dtype="float16")
    pairs = list(zip(queries, targets))
    r32 = recall_at_k(load_embeddings(str(tmp_path / "g32"))[1], ids, pairs, [1, 10, 100]).recall
    r16 = recall_at_k(load_embeddings(str(tmp_path / "g16"))[1], ids, pairs, [1, 10, 100]).recall
    assert 0 < r32[1] < 1 and all(abs(r16[k] - r32[k]) <= 0.01 for k in r32), (r32, r16)
    assert main(["neighbors", "--embeddings", str(tmp_path / "f16"), "--k", "5",
                 "--out", str(tmp_path / "related.parquet")]) == 0
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "related.parquet")) == 4000 * 5


@pytest.mark.parametrize("case,message", [
    ("1d", "expected a 2-D [notes, dim] array, got shape (3,)"),
    ("int", "dtype int64; embeddings are float32 or float16"),
    ("garbage", "not a readable .npy array"),
    ("count", "2 ids in ids.txt but 3 rows in embeddings.npy"),
    ("no_ids", "ids.txt: no ids beside embeddings.npy")])
def test_bad_embeddings_folders_are_one_line_errors_naming_the_file(tmp_path, case, message, capsys):
    d = tmp_path / "emb"
    d.mkdir()
    arrays = {"1d": np.ones(3, np.float32), "int": np.ones((3, 2), np.int64)}
    if case == "garbage":
        (d / "embeddings.npy").write_bytes(b"not an array")
    else:
        np.save(d / "embeddings.npy", arrays.get(case, np.ones((3, 2), np.float32)))
    if case != "no_ids":
        (d / "ids.txt").write_text("a\nb\n" if case == "count" else "a\nb\nc\n")
    with pytest.raises((EmbeddingsError, FileNotFoundError), match=message.replace("[", "\\[").replace("(", "\\(")
                       .replace(")", "\\)")):
        load_embeddings(str(d))
    assert main(["neighbors", "--embeddings", str(d), "--k", "1", "--out", str(tmp_path / "r.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


# ----------------------------------------------------------------------------- two ranks: kill -9, resume

@pytest.mark.slow
def test_two_ranks_killed_mid_way_resume_from_their_parts_and_equal_an_unbroken_run(setup, capsys):
    """2 gloo ranks, batch 2, a part every batch: 4 batches and 4 parts per rank. Rank 1 SIGKILLs itself
    after its part 1 (torchrun then ends rank 0). The rerun skips the finished parts (fewer batches
    embedded, in the log) and its files equal, byte for byte, an unbroken 2-rank run's."""
    root = setup["root"]
    args = ["-m", "notellm2.launcher", "embed", "--config", setup["config"], "--batch-size", "2", "--part-every", "1"]
    killed = root / "killed"
    res = run_command([*args, "--out", str(killed)], nproc=2, timeout=300, check=False,
                      env={"NOTELLM2_TEST_DIE_AFTER_PART": "1:1"})
    assert res.returncode != 0, res.describe()
    assert "rank 1 kills itself (SIGKILL) after part 1" in res.output, res.describe()
    parts = sorted(os.listdir(killed / "parts"))
    assert "rank00001-00001.npz" in parts and "rank00001-00002.npz" not in parts, parts
    assert not (killed / "embeddings.npy").exists()

    # other settings (here the world size and batch size of one process) are refused, the parts kept
    assert main(["embed", "--config", setup["config"], "--out", str(killed), "--batch-size", "2",
                 "--part-every", "1"]) == 2
    err = capsys.readouterr().err
    assert "world_size 2 there, 1 now" in err and str(killed / "parts") in err, err
    assert "rank00001-00001.npz" in os.listdir(killed / "parts")

    resumed = run_command([*args, "--out", str(killed)], nproc=2, timeout=300)
    assert "rank 1: resumed: 2 parts (2 batches) done, embedding 2 of 4 batches" in resumed.output, resumed.describe()
    assert "rank 1: embedded 2 batches" in resumed.output, resumed.describe()
    assert not (killed / "parts").exists()

    whole = root / "whole"
    unbroken = run_command([*args, "--out", str(whole)], nproc=2, timeout=300)
    assert "rank 1: embedded 4 batches" in unbroken.output and "resumed" not in unbroken.output
    ids_k, emb_k = load_embeddings(str(killed))
    ids_w, emb_w = load_embeddings(str(whole))
    assert ids_k == ids_w and len(ids_w) == setup["notes"] == len(set(ids_w))
    assert np.array_equal(emb_k.numpy(), emb_w.numpy())
    assert read_bytes(killed) == read_bytes(whole)


# ----------------------------------------------------------------------------- a finished folder's request

def _safetensors(path, metadata_order, value=1.0):
    """A one-tensor safetensors file whose header lists its metadata in the given key order (the writer's
    map order differs between processes: two saves of one checkpoint gave {step, format} and {format, step})."""
    import struct

    data = np.full(4, value, np.float32).tobytes()
    header = {"__metadata__": {k: {"step": "12", "format": "pt"}[k] for k in metadata_order},
              "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, len(data)]}}
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + data)


def test_model_fingerprint_is_the_exports_content_not_its_bytes(tmp_path):
    from notellm2.launcher.eval.provenance import model_fingerprint

    def export(name, order, value=1.0, npz_at=(2020, 1, 1, 0, 0, 0)):
        d = tmp_path / name
        d.mkdir()
        (d / "notellm2_export.json").write_text('{"format": 1}')
        _safetensors(d / "model.safetensors", order, value)
        import zipfile
        with zipfile.ZipFile(d / "reference_embeddings.npz", "w") as z:  # np.savez stamps the time
            z.writestr(zipfile.ZipInfo("both.npy", date_time=npz_at), b"vectors")
        return str(d)

    a = model_fingerprint(export("a", ("step", "format")), None)
    assert model_fingerprint(export("b", ("format", "step"), npz_at=(2021, 2, 2, 0, 0, 0)), None) == a
    assert model_fingerprint(export("c", ("step", "format"), value=2.0), None) != a  # other weights
    e = export("d", ("step", "format"))
    (tmp_path / "d" / "notellm2_export.json").write_text('{"format": 1, "fingerprint": "abc"}')
    assert model_fingerprint(e, None) == "abc"  # format 2 carries its own
