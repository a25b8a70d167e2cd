import json
import subprocess
import sys

import numpy as np
import pandas as pd

from launcher.evaluate import save_embeddings
from tests.multirank import REPO


def test_eval_verb_reads_embeddings_and_pairs_and_reports_recall(tmp_path):
    ids = ["a", "b", "c", "d"]
    emb = np.array([[1.0, 0.0], [0.995, 0.0998], [-1.0, 0.0], [0.7071, 0.7071]], dtype=np.float32)
    save_embeddings(str(tmp_path / "emb"), ids, emb)
    (tmp_path / "pairs").mkdir()
    pd.DataFrame({"query_id": ["a", "a", "c", "b"], "target_id": ["b", "c", "d", "a"],
                  "score": [1.0, 1.0, 1.0, 1.0], "split": ["test", "test", "test", "train"]}
                 ).to_parquet(tmp_path / "pairs" / "pairs.parquet")
    out = subprocess.run([sys.executable, "-m", "launcher", "eval", "--embeddings", str(tmp_path / "emb"),
                          "--pairs", str(tmp_path / "pairs"), "--k", "1", "3", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "Recall@1: 0.6667" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["recall"] == {"1": 2 / 3, "3": 1.0} and report["num_pairs"] == 3
