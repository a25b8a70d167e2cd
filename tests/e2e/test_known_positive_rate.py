"""scripts/known_positive_rate.py counts, per anchor row, the in-batch columns that
`loss.mask_known_positives` masks: a known related note other than the anchor's partner, and never a
copy of the anchor or of its partner (the loss excludes those anyway)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script():
    spec = importlib.util.spec_from_file_location("known_positive_rate",
                                                  os.path.join(REPO, "scripts", "known_positive_rate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counts_only_known_positives_that_are_not_the_partner():
    # two pairs, so every batch holds both: rows [a, c; b, d]
    q, t = np.array(["a", "c"]), np.array(["b", "d"])
    known = {"a": {"b", "c"}, "b": {"a"}, "c": set(), "d": {"a", "b", "d"}}
    m = _script().masked_per_anchor(q, t, known, batch=2, draws=20)  # both pair orders come up
    assert m.shape == (20, 4)
    # per note, whatever the pair order: a knows c (not its partner b) -> 1; b's known a is its partner
    # -> 0; c knows nothing -> 0; d knows a and b (its partner is c) -> 2, and d itself does not count
    for row in m:
        assert sorted(row.tolist()) == [0, 0, 1, 2]
