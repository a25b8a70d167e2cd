"""Search across ranks: `neighbors` and `index update` on 2 real ranks (torchrun, gloo) write the same bytes
as one process, and a run killed mid-way resumes from the parts it finished (docs/new_notes.md)."""
import os

from notellm2.launcher.cli import main
from notellm2.launcher.eval.search_parts import DIE_AFTER_PARTS_ENV
from tests.helpers.multirank import run_command
from tests.launcher.eval.test_index import two_days


def test_two_ranks_write_what_one_writes_and_a_killed_run_resumes(tmp_path, capsys):
    day1, day2 = two_days(tmp_path)
    one = str(tmp_path / "one.parquet")
    assert main(["neighbors", "--embeddings", day2, "--k", "5", "--chunk", "32", "--out", one]) == 0
    assert main(["index", "build", "--embeddings", day1, "--out", str(tmp_path / "v1"), "--k", "5", "--reserve", "2"]) == 0
    assert main(["index", "update", "--index", str(tmp_path / "v1"), "--embeddings", day2, "--out",
                 str(tmp_path / "one"), "--chunk", "8"]) == 0
    capsys.readouterr()

    # neighbors on 2 ranks, rank 1 killed after its second part; the rerun (here one process: the parts
    # do not depend on the world size) computes only the missing parts
    two = str(tmp_path / "two.parquet")
    killed = run_command(["-m", "notellm2.launcher", "neighbors", "--embeddings", day2, "--k", "5", "--chunk", "32",
                          "--out", two], nproc=2, timeout=240, env={DIE_AFTER_PARTS_ENV: "1:2"}, check=False)
    assert killed.returncode != 0 and "rank 1 kills itself (SIGKILL) after 2 parts" in killed.output, killed.describe()
    left = sorted(n for n in os.listdir(tmp_path / "two.parquet.parts") if n.endswith(".npz"))
    assert not os.path.exists(two) and len(left) >= 2 and "neighbors-000003.npz" in left, left
    assert main(["neighbors", "--embeddings", day2, "--k", "5", "--chunk", "32", "--out", two]) == 0
    assert f"resumed, {len(left)} parts done, {13 - len(left)} computed" in capsys.readouterr().out
    assert open(two, "rb").read() == open(one, "rb").read() and not (tmp_path / "two.parquet.parts").exists()

    # the update on 2 ranks: the same files, byte for byte
    run_command(["-m", "notellm2.launcher", "index", "update", "--index", str(tmp_path / "v1"), "--embeddings", day2,
                 "--out", str(tmp_path / "two"), "--chunk", "8"], nproc=2, timeout=240)
    for name in ("related.parquet", "neighbors.npy", "scores.npy", "complete.npy", "ids.txt", "labels.npy",
                 "vectors.npy"):
        assert open(tmp_path / "two" / name, "rb").read() == open(tmp_path / "one" / name, "rb").read(), name
    assert not (tmp_path / "two.parts").exists()
