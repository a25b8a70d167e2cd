"""scripts/bench_catalog.py, the benchmark catalog's one-command build: a stage is reused only when its
output exists and its recorded argv and upstream are the same, and a real build on a slice of the
tree in the openclipart packages' layout gives the data and a summary that agrees with the files."""
from __future__ import annotations

import json
import os
import sys

import pytest

from tests.helpers.paths import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import bench_catalog  # noqa: E402


def test_a_changed_stage_reruns_with_everything_downstream_and_nothing_upstream(tmp_path, monkeypatch):
    calls = []

    def fake_cli(argv):
        calls.append(argv[1])
        out = argv[argv.index("--out") + 1]
        with open(out, "w") as fh:
            fh.write(" ".join(argv))
        return 0

    monkeypatch.setattr("notellm2.launcher.cli.main", fake_cli)
    out = str(tmp_path)

    def chain(users):
        s = bench_catalog.stage(out, "a", os.path.join(out, "a.txt"), ["data", "first", "--out", os.path.join(out, "a.txt")],
                                None, log=lambda _: None)
        s = bench_catalog.stage(out, "b", os.path.join(out, "b.txt"), ["data", "second", "--out", os.path.join(out, "b.txt"),
                                                                       "--users", str(users)], s, log=lambda _: None)
        bench_catalog.stage(out, "c", os.path.join(out, "c.txt"), ["data", "third", "--out", os.path.join(out, "c.txt")],
                            s, log=lambda _: None)

    chain(10)
    assert calls == ["first", "second", "third"]
    chain(10)
    assert calls == ["first", "second", "third"]  # all reused
    chain(20)
    assert calls[3:] == ["second", "third"]  # b's argv changed: b and c again, a reused
    os.remove(os.path.join(out, "c.txt"))  # an interrupted stage (output gone) runs again
    chain(20)
    assert calls[5:] == ["third"]
    os.remove(os.path.join(out, ".stages", "a.json"))  # output without its record: not trusted
    chain(20)
    assert calls[6:] == ["first"]  # same argv and parent, so b and c stay valid


def test_a_rerun_of_a_folder_stage_replaces_the_folder(tmp_path, monkeypatch):
    """The cache stage's output is DIR/cache.json and cache-vision refuses a DIR that exists: a rerun (here a
    changed argv) removes DIR, so the verb runs; it used to remove only cache.json and the record, which left
    an 80-minute cache unreadable and the rerun refused."""
    def fake_cache_vision(argv):
        out = argv[argv.index("--out") + 1]
        if os.path.exists(out):
            return 2  # what cache-vision does: "--out exists; pass --overwrite"
        os.makedirs(out)
        for name in ("tokens.npy", "cache.json"):
            with open(os.path.join(out, name), "w") as fh:
                fh.write(" ".join(argv))
        return 0

    monkeypatch.setattr("notellm2.launcher.cli.main", fake_cache_vision)
    out, cache = str(tmp_path), str(tmp_path / "vision_cache" / "lite0")

    def run(size):
        return bench_catalog.stage(out, "cache", os.path.join(cache, "cache.json"),
                                   ["data", "cache-vision", "--out", cache, "--size", size], None, log=lambda _: None,
                                   folder=cache)

    run("224")
    run("260")  # a changed argv: the old folder goes, the verb writes a new one
    assert open(os.path.join(cache, "tokens.npy")).read().endswith("--size 260")


def test_a_stage_record_does_not_depend_on_where_the_checkout_is(monkeypatch):
    """A worktree of the repository elsewhere runs the same stages: the config path inside the argv differs
    only by the checkout's folder, so the record stays valid (a changed stamp reruns the stage)."""
    here = bench_catalog._stamp(["data", "cache-vision", "--config", bench_catalog.DEMO_CONFIG], "p")
    monkeypatch.setattr(bench_catalog, "REPO", "/elsewhere/wt")
    there = bench_catalog._stamp(["data", "cache-vision", "--config", "/elsewhere/wt/configs/demo_cpu.yaml"], "p")
    assert here == there
    assert there != bench_catalog._stamp(["data", "cache-vision", "--config", "/elsewhere/wt/configs/other.yaml"], "p")


@pytest.mark.parametrize("tower,size,factory", [("lite0", 224, "efficientnet_lite:build"),
                                                ("lite2", 260, "efficientnet_lite:build_lite2")])
def test_the_cache_stage_names_each_tower_as_the_ladder_runs_it(tower, size, factory):
    """The cache-vision command line parses, and its config is the tower the ladder's runs use (the same
    TOWERS overrides on configs/demo_cpu.yaml), so their tower keys match. The tower itself runs in the
    real build (docs/benchmark.md) and in tests/modeling/test_vision.py."""
    from notellm2.launcher.cli import build_parser, config_from_args

    args = build_parser().parse_args(bench_catalog.cache_argv(tower, ["s/pairs-train-*.tar", "s/notes-test-*.tar"], "c"))
    assert args.shards == ["s/pairs-train-*.tar", "s/notes-test-*.tar"] and args.out == "c"
    vision = config_from_args(args).model.vision
    assert (vision.kind, vision.image_size) == ("plugin", size) and vision.factory.endswith(factory)


def _clipart_tree(root, categories=("animals/birds", "food", "tools"), per_category=8):
    """A small tree in the packages' layout (svg/ with metadata, png/ beside it), coloured squares."""
    from PIL import Image

    svg = ('<svg><metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>{c} item {i}</dc:title>'
           '<dc:description>a drawing of {c}</dc:description><dc:subject><rdf:Bag><rdf:li>{c}</rdf:li></rdf:Bag>'
           '</dc:subject></cc:Work></rdf:RDF></metadata></svg>')
    for k, cat in enumerate(categories):
        (root / "svg" / cat).mkdir(parents=True)
        (root / "png" / cat).mkdir(parents=True)
        for i in range(per_category):
            (root / "svg" / cat / f"x{i}.svg").write_text(svg.format(c=cat, i=i))
            img = Image.new("RGB", (48, 48), (255, 255, 255))
            img.paste(((60 * k + 30 * i) % 256, (90 * i) % 256, 200 - 20 * k), (8, 8, 40, 40))
            img.save(root / "png" / cat / f"x{i}.png")
    return str(root)


def test_a_small_build_and_its_summary(tmp_path):
    """The whole chain on a small tree in the packages' layout (the real packages' import is
    tests/data_shards/openclipart's; the towers' stage is the test above and the real build)."""
    from notellm2.data_shards.catalog.notes import load_catalog
    from notellm2.data_shards.mining.pairs_file import read_pairs

    out = str(tmp_path / "bench")
    argv = [out, "--root", _clipart_tree(tmp_path / "oc"), "--min-per-category", "2", "--max-per-category", "6",
            "--users", "40", "--towers", "--no-validate"]
    assert bench_catalog.main(argv) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    notes = load_catalog(os.path.join(out, "catalog.jsonl"))
    # 3 categories of 8 items, 6 kept each; the blanked ones have no text at all
    assert summary["notes"] == len(notes) == 18 and summary["categories"] == 3
    assert summary["blanked"] == sum(not (n.title or n.content or n.topics) for n in notes) > 0
    split = read_pairs(os.path.join(out, "pairs"))["split"]
    assert summary["pairs_by_split"] == {s: int((split == s).sum()) for s in ("train", "val", "test")}
    assert summary["pairs_by_split"]["train"] > 0
    assert summary["colour_neighbour_test_pairs"]["same_category_pairs_with_histograms"] >= 0
    stamps = sorted(os.listdir(os.path.join(out, ".stages")))
    assert stamps == ["catalog.json", "pairs.json", "shards.json", "views.json"]
    before = {f: open(os.path.join(out, ".stages", f)).read() for f in stamps}
    assert bench_catalog.main(argv) == 0  # everything reused: the records are untouched
    assert {f: open(os.path.join(out, ".stages", f)).read() for f in stamps} == before


def test_category_knowledge_alone_scores_by_the_fair_tie_rule():
    """Hand-built: pool t1, p1 in category a; t2, p2, p3 in b. Query q1 (a) -> t1 (a): 0 above, 1 tied:
    R@1 1/2, RR (1 + 1/2) / 2. Query q2 (a) -> t2 (b): the 2 notes of a above, 2 tied: R@1 0, R@5 1,
    RR (1/3 + 1/4 + 1/5) / 3."""
    cat = {"q1": "a", "t1": "a", "p1": "a", "q2": "a", "t2": "b", "p2": "b", "p3": "b"}
    got = bench_catalog.category_only(["q1", "q2"], ["t1", "t2"], ["t1", "p1", "t2", "p2", "p3"], cat)
    assert got["pool_notes_in_the_query_category_median"] == 2.0
    assert got["category_only"] == {"R@1": 0.25, "R@5": 1.0, "R@10": 1.0,
                                    "MRR": round((0.75 + (1 / 3 + 1 / 4 + 1 / 5) / 3) / 2, 4)}
