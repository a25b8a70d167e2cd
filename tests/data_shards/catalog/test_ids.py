import hashlib
import subprocess
import sys

import numpy as np
import pytest

from notellm2.data_shards.ids import note_id_hash, note_id_hashes


def test_hash_matches_documented_formula_and_is_int64():
    for nid in ["a", "note-000001", "笔记-42", ""]:
        expected = int.from_bytes(hashlib.blake2b(nid.encode("utf-8"), digest_size=8).digest(), "big") & (2**63 - 1)
        h = note_id_hash(nid)
        assert h == expected
        assert 0 <= h < 2**63


def test_hash_is_stable_across_processes():
    # Python's own hash() is salted per process; ours must not be.
    code = "from notellm2.data_shards.ids import note_id_hash; print(note_id_hash('note-7'))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": ""}, cwd=None).stdout.strip()
            for seed in (1, 2)}
    assert outs == {str(note_id_hash("note-7"))}


def test_distinct_ids_give_distinct_hashes_and_array_form():
    ids = [f"n{i}" for i in range(20000)]
    arr = note_id_hashes(ids)
    assert arr.dtype == np.int64 and (arr >= 0).all()
    assert len(set(arr.tolist())) == len(ids)
    assert arr[123] == note_id_hash("n123")


def test_non_string_id_is_rejected():
    with pytest.raises(TypeError, match="strings"):
        note_id_hash(12)
