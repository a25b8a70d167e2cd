"""An export written before the import root (format 1, `tests/fixtures/export_format1`) still loads:
its plugin factory is spelled `modeling.plugins.efficientnet_lite:build`, which resolves through the
one table of old spellings (notellm2.codenames), and its stored reference vectors are reproduced."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

from notellm2.codenames import canonical
from tests.helpers.paths import REPO

FIXTURE = os.path.join(REPO, "tests", "fixtures", "export_format1")


def test_old_spellings_map_to_the_new_modules():
    assert canonical("modeling.plugins.efficientnet_lite") == "notellm2.modeling.plugins.efficientnet_lite"
    assert canonical("launcher.serving") == "notellm2.modeling.pretrained"
    assert canonical("launcher.components") == "notellm2.launcher.train.components"
    assert canonical("data_shards.writer") == "notellm2.data_shards.writing.shards"
    assert canonical("tests.helpers.doubles") == "tests.helpers.doubles"  # not ours: unchanged
    assert canonical("notellm2.modeling.vision") == "notellm2.modeling.vision"


def test_a_format1_export_loads_and_reproduces_its_reference_vectors(tmp_path):
    with open(os.path.join(FIXTURE, "notellm2_export.json")) as fh:
        meta = json.load(fh)
    assert meta["format"] == 1 and meta["model"]["vision"]["factory"] == "modeling.plugins.efficientnet_lite:build"
    export = str(tmp_path / "export")
    shutil.copytree(FIXTURE, export)
    code = textwrap.dedent(f"""
        import json, sys
        from notellm2.modeling.pretrained import NoteEncoder
        enc = NoteEncoder.from_pretrained({export!r})
        gaps = enc.reference_gap()
        bad = sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed' or m.startswith('notellm2.launcher'))
        print(json.dumps({{"gaps": gaps, "bad": bad, "variant": enc.variant}}))
    """)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["bad"] == [] and got["variant"] == "notellm2"
    assert set(got["gaps"]) == {"both", "text", "image"}
    assert max(got["gaps"].values()) < 1e-5, got["gaps"]
