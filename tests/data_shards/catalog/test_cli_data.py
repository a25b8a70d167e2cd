"""`notellm2 data validate` and `notellm2 data write-shards` as a user runs them."""
import json
import os
import subprocess
import sys

from notellm2.launcher.cli import main
from tests.helpers.data import synthetic_catalog, synthetic_pairs, write_garbage
from tests.helpers.paths import REPO

NOTELLM2 = os.path.join(os.path.dirname(sys.executable), "notellm2")


def test_console_script_end_to_end(tmp_path):
    cat = synthetic_catalog(tmp_path / "cat", n_notes=30, n_categories=3)
    pairs = synthetic_pairs(tmp_path / "pairs", cat, n_pairs=40)
    out = subprocess.run([NOTELLM2, "data", "validate", "--catalog", cat, "--workers", "1"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "30 records, 30 with an image" in out.stdout and "OK: 0 errors, 0 warnings" in out.stdout
    shards = str(tmp_path / "shards")
    out = subprocess.run([NOTELLM2, "data", "write-shards", "--pairs", pairs, "--catalog", cat, "--out", shards,
                          "--shard-size", "10", "--image-size", "32", "--workers", "2"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    m = json.load(open(os.path.join(shards, "manifest.json")))
    assert f"pairs-train: {os.path.join(shards, m['patterns']['pairs-train'])}" in out.stdout
    assert "re-encoding images" in out.stderr  # the progress bar
    assert main(["data", "validate", "--shards", shards]) == 0


def test_validate_exit_codes_and_report(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    write_garbage(tmp_path / "img" / "bad.jpg")
    lines = [{"note_id": "a", "title": "t", "content": "c", "image": "img/bad.jpg"},
             {"note_id": "a", "title": "t", "content": "c"},
             {"note_id": "b", "title": "", "content": ""}]
    p = tmp_path / "notes.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["data", "validate", "--catalog", str(p), "--workers", "1", "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "ERROR duplicate_id: 1 (first: a)" in text and "ERROR unreadable_image: 1 (first: a)" in text
    assert "warning empty_text: 1 (first: b)" in text and "FAILED: 2 errors, 1 warnings" in text
    assert main(["data", "validate", "--catalog", str(p), "--json", "--no-progress", "--workers", "1"]) == 1
    report = json.loads(capsys.readouterr().out)["catalog"]
    assert report["errors"] == 2 and report["problems"]["unreadable_image"]["severity"] == "error"
    # warnings only: exit 0
    p.write_text(json.dumps(lines[2]) + "\n")
    assert main(["data", "validate", "--catalog", str(p), "--no-progress"]) == 0
    # the catalog cannot be read at all: exit 2 with the path in the message
    assert main(["data", "validate", "--catalog", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: catalog file does not exist" in capsys.readouterr().err
    assert main(["data", "validate"]) == 2


def test_write_shards_cli_errors_and_policy_flag(tmp_path, capsys):
    cat = synthetic_catalog(tmp_path / "cat", n_notes=12, n_categories=2)
    pairs = synthetic_pairs(tmp_path / "pairs", cat, n_pairs=10, extra_rows=[("n000000", "ghost", 1.0, "train")])
    out = str(tmp_path / "s")
    args = ["data", "write-shards", "--pairs", pairs, "--catalog", cat, "--out", out, "--workers", "1",
            "--no-progress", "--splits", "train", "--bad-image-policy", "skip_pair"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"missing_note: 1 (first: ghost; every one in {out}/problems.jsonl)" in text
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["settings"]["bad_image_policy"] == "skip_pair" and m["settings"]["splits"] == ["train"]
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().err  # the same request: a no-op
    assert main(args + ["--seed", "1"]) == 2 and "seed 0 there, 1 now" in capsys.readouterr().err
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert main(args[:-4] + ["--splits", "train,dev", "--overwrite"]) == 2
    assert "splits: got 'dev'" in capsys.readouterr().err
