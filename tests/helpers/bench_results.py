"""Checks of the `RESULT {json}` lines a benchmark ends with (the project's form: name, figure,
bound_or_baseline, ratio, target, pass), shared by the benchmarks' tiny tests.

    results = result_lines(proc.stdout)              # every RESULT line; the last line must be one
    check_result(results[0], "<=", 1.5)              # ratio = figure / bound, pass = ratio <= 1.5

A smoke test that only asks for positive numbers passes with the ratio inverted or the pass flag
hard-coded; these checks tie the printed figures to each other, so such a slip fails.
"""
from __future__ import annotations

import json
import operator
from typing import Optional

KEYS = {"name", "figure", "bound_or_baseline", "ratio", "target", "pass"}
_OPS = {"<=": operator.le, ">=": operator.ge}


def result_lines(stdout: str) -> list[dict]:
    """The parsed RESULT lines of a benchmark's stdout; the output must end with one."""
    lines = stdout.strip().splitlines()
    assert lines and lines[-1].startswith("RESULT "), stdout[-2000:]
    return [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]


def ratio_interval(figure: float, bound: float, digits: int) -> tuple[float, float]:
    """Where figure / bound lies when both were rounded to `digits` decimals (bound > 0)."""
    half = 0.5 * 10.0 ** -digits
    ends = [(figure + a) / (bound + b) for a in (-half, half) for b in (-half, half) if bound + b > 0]
    return min(ends), max(ends)


def check_result(r: dict, op: Optional[str], target: Optional[float], digits: int, ratio_digits: int, *,
                 ratio: Optional[float] = None, also: bool = True) -> None:
    """`r` has the project's keys; its ratio is figure / bound_or_baseline (or `ratio`, for a benchmark whose
    ratio is another quotient) within what the printed rounding allows (the benchmark rounds the figure and
    bound to `digits` decimals, the ratio to `ratio_digits`); its pass flag is `ratio op target` and `also`
    (the benchmark's other conditions, e.g. identical outputs), or `also` alone when op is None (a figure
    recorded against no target)."""
    assert KEYS <= set(r), (KEYS - set(r), r)
    assert isinstance(r["name"], str) and r["name"]
    assert isinstance(r["pass"], bool), r
    for key in ("figure", "bound_or_baseline", "ratio"):
        assert isinstance(r[key], (int, float)) and not isinstance(r[key], bool), (key, r)
    slack = 0.5 * 10.0 ** -ratio_digits + 1e-12  # the ratio itself was rounded
    if ratio is not None:
        assert abs(r["ratio"] - ratio) <= slack, (r, ratio)
    else:
        assert r["bound_or_baseline"] > 0, r
        lo, hi = ratio_interval(r["figure"], r["bound_or_baseline"], digits)
        assert lo - slack <= r["ratio"] <= hi + slack, (r, (lo, hi))
    if not also or op is None:
        assert r["pass"] is also, (r, also)
    elif abs(r["ratio"] - target) > slack:  # a rounded ratio at the target cannot tell which side it was on
        assert r["pass"] == _OPS[op](r["ratio"], target), (r, op, target)
