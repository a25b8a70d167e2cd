"""Writing an evaluation report (notellm2.launcher.eval.evaluate.evaluate_runs): printed tables, JSON,
markdown, TensorBoard scalars and a PNG of Recall@K against K. One table per subset: rows are runs,
columns Recall@K, NDCG@K and MRR; the paired differences against a baseline get a table of their own."""
from __future__ import annotations

import json
import os

from notellm2.files import atomic_write_text, commit_file, temporary_name


def _k_label(k: int) -> str:
    for unit, n in (("M", 1_000_000), ("k", 1000)):
        if k >= n and k % n == 0:
            return f"{k // n}{unit}"
    return str(k)


def _subsets(report: dict) -> list[str]:
    """Subsets with figures in at least one run (n/a ones, empty or equal to all, are named with their
    reason in the notes lines and kept in the JSON)."""
    names: list[str] = []
    for run in report["runs"]:
        names += [s for s, v in run["subsets"].items() if s not in names and "recall" in v]
    return names


def _ks(report: dict) -> list[int]:
    return sorted({k for run in report["runs"] for k in run["ks"]})


def _cell(value, ci, with_ci: bool, signed: bool = False) -> str:
    if value is None:
        return "-"
    f = "+.3f" if signed else ".3f"
    return f"{value:{f}} [{ci[0]:{f}}, {ci[1]:{f}}]" if with_ci else f"{value:{f}}"


def _tables(report: dict, with_ci: bool) -> list[tuple[str, list[str], list[list[str]]]]:
    """(subset, header, rows) per subset."""
    ks = _ks(report)
    header = ["run", "n"] + [f"R@{_k_label(k)}" for k in ks] + [f"NDCG@{_k_label(k)}" for k in ks] + ["MRR"]
    out = []
    for s in _subsets(report):
        rows = []
        for run in report["runs"]:
            sub = run["subsets"].get(s)
            if sub is None or "recall" not in sub:
                rows.append([run["name"], "n/a" if sub is not None else "-"] + ["-"] * (2 * len(ks) + 1))
                continue
            row = [run["name"], str(sub["n"])]
            row += [_cell(sub["recall"].get(str(k)), sub["ci"].get(str(k)), with_ci) for k in ks]
            row += [_cell(sub["ndcg"].get(str(k)), sub["ndcg_ci"].get(str(k)), with_ci) for k in ks]
            row.append(_cell(sub["mrr"], sub["mrr_ci"], with_ci))
            rows.append(row)
        out.append((s, header, rows))
    return out


def _fixed(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [line(header)] + [line(r) for r in rows]


def format_table(report: dict, with_ci: bool = False) -> str:
    """Fixed-width tables for the terminal, one per subset, each under a line `subset NAME (ties RULE)`."""
    out = []
    for s, header, rows in _tables(report, with_ci):
        out += [f"subset {s} (ties {report.get('ties', 'fair')})"] + _fixed(header, rows) + [""]
    return "\n".join(out).rstrip("\n")


def notes_lines(report: dict) -> list[str]:
    """What the tables do not show: sizes, capped K, n/a subsets with their reason, ties, approximate-search recall."""
    out = [f"protocol {report['protocol']}: " + ", ".join(f"{k} {v}" for k, v in report["protocol_stats"].items())]
    reasons = [{s: v["na"] for s, v in run["subsets"].items() if "na" in v} for run in report["runs"]]
    shared = {s: why for s, why in reasons[0].items() if all(r.get(s) == why for r in reasons)} if reasons else {}
    for run in report["runs"]:
        sizes = ", ".join(f"{s} {v['n']}" for s, v in run["subsets"].items() if "na" not in v)
        line = f"{run['name']}: pool {run['pool_size']}, queries {run['num_queries']}"
        if run["num_skipped"]:
            line += f" (skipped {run['num_skipped']} pairs with a note without a vector)"
        if run["mean_rank"] is not None:
            line += f", mean target rank {run['mean_rank']:.1f}"
        if run.get("tied_queries") is not None:
            line += f", {run['tied_queries']} queries with a tie at the target"
        if run["capped"]:
            line += f"; K capped at the pool size: {', '.join(_k_label(k) for k in run['capped'])}"
        if run.get("not_reported_approximate"):
            line += f"; not reported with {report['backend']}: {', '.join(map(_k_label, run['not_reported_approximate']))}"
        if run.get("faiss_recall_vs_exact") is not None:
            line += (f"; {report['backend']} recall against exact search {run['faiss_recall_vs_exact']:.4f} (ties as "
                     f"the index returns them; MRR counts 0 beyond its top {run['mrr_truncated_at']})")
        out += [line, f"  queries per subset: {sizes}"]
        out += [f"  {s}: n/a, {v['na']}" for s, v in run["subsets"].items() if "na" in v and s not in shared]
    if shared:
        out.append("n/a in every run: " + "; ".join(f"{s} ({why})" for s, why in shared.items()))
    b = report["bootstrap"]
    ties = report.get("ties", "fair")
    out.append(f"ties: {ties} (" + ("expected Recall@K, NDCG@K and MRR under random tie-breaking" if ties == "fair"
                                    else "every tie counted against the target") + ")")
    out.append(f"intervals: {int(b['level'] * 100)}% bootstrap over query notes, {b['resamples']} resamples, seed {b['seed']}")
    return out


def _paired_rows(report: dict, with_ci: bool) -> tuple[list[str], list[list[str]]]:
    p = report["paired"]
    ks = sorted({k for r in p["runs"] for k in r["ks"]})
    header = ["run", "subset", "n"] + [f"R@{_k_label(k)}" for k in ks] + ["MRR"]
    rows = []
    for r in p["runs"]:
        for s, v in r["subsets"].items():
            cells = [v["recall"].get(str(k)) for k in ks]
            rows.append([r["name"], s, str(v["n"])]
                        + [_cell(c["diff"], c["ci"], with_ci, signed=True) if c else "-" for c in cells]
                        + [_cell(v["mrr"]["diff"], v["mrr"]["ci"], with_ci, signed=True)])
    return header, rows


def _paired_title(report: dict) -> str:
    p, b = report["paired"], report["bootstrap"]
    skipped = [f"{r['name']} {r['only_in_run']}/{r['only_in_baseline']}" for r in p["runs"]
               if r["only_in_run"] or r["only_in_baseline"]]
    return (f"paired: run minus {p['baseline']}, over the pairs both scored, {int(b['level'] * 100)}% bootstrap "
            f"over query notes ({b['resamples']} resamples, seed {b['seed']}, the same draws for both runs; ties "
            f"{p['ties']})" + (f"; pairs only in the run / only in the baseline: {', '.join(skipped)}" if skipped else ""))


def format_paired(report: dict) -> str:
    header, rows = _paired_rows(report, with_ci=True)
    return "\n".join([_paired_title(report)] + _fixed(header, rows))


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def markdown_table(report: dict) -> str:
    md = []
    for s, header, rows in _tables(report, with_ci=True):
        md += [f"### {s}", ""] + _md(header, rows) + [""]
    if report.get("paired"):
        header, rows = _paired_rows(report, with_ci=True)
        md += ["### paired", "", _paired_title(report), ""] + _md(header, rows) + [""]
    return "\n".join(md + [f"- {line.strip()}" for line in notes_lines(report)]) + "\n"


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)


def to_json(obj, indent: int = 2, level: int = 0) -> str:
    """JSON indented like json.dumps(indent=2), except that a list of numbers or strings stays on one
    line: the per-query records (thousands of entries per run) would otherwise take a line each."""
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {to_json(v, indent, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return "[\n" + ",\n".join(inner + to_json(v, indent, level + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def write_json(report: dict, path: str) -> None:
    _atomic_write(path, to_json(report) + "\n")


def write_markdown(report: dict, path: str) -> None:
    _atomic_write(path, markdown_table(report))


def write_tensorboard(report: dict, log_dir: str) -> None:
    """Scalars per run and subset (n/a subsets have none): `recall/<subset>` and `ndcg/<subset>` with
    step = K, `recall/<subset>/R@<K>` and `ndcg/<subset>/NDCG@<K>` at step 0, `mrr/<subset>` at step 0;
    one writer per run."""
    from torch.utils.tensorboard import SummaryWriter

    for run in report["runs"]:
        w = SummaryWriter(os.path.join(log_dir, run["name"]))
        try:
            for sub, v in run["subsets"].items():
                if "recall" not in v:
                    continue
                for metric, label in (("recall", "R"), ("ndcg", "NDCG")):
                    for k, r in v[metric].items():
                        w.add_scalar(f"{metric}/{sub}", r, global_step=int(k))
                        w.add_scalar(f"{metric}/{sub}/{label}@{_k_label(int(k))}", r, global_step=0)
                w.add_scalar(f"mrr/{sub}", v["mrr"], global_step=0)
        finally:
            w.close()


def plot_recall(report: dict, path: str, subset: str = "all") -> None:
    """Recall@K against K (log scale), one line per run with its 95 % band."""
    from notellm2.errors import require

    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    try:
        for run in report["runs"]:
            sub = run["subsets"].get(subset)
            ks = [k for k in run["ks"] if sub and "recall" in sub and sub["recall"].get(str(k)) is not None]
            if not ks:
                continue
            r = [sub["recall"][str(k)] for k in ks]
            line, = ax.plot(ks, r, marker="o", label=f"{run['name']} (n={sub['n']})")
            ax.fill_between(ks, [sub["ci"][str(k)][0] for k in ks], [sub["ci"][str(k)][1] for k in ks],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        all_ks = _ks(report)
        ax.set_xticks(all_ks, [_k_label(k) for k in all_ks])
        ax.minorticks_off()
        ax.set_xlabel("K")
        ax.set_ylabel(f"Recall@K ({subset}, ties {report.get('ties', 'fair')})")
        ax.set_ylim(0, 1)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"I2I Recall@K, protocol {report['protocol']} ({report['backend']})")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = temporary_name(path) + ".png"  # savefig picks the format from the suffix
        fig.savefig(tmp)
        commit_file(tmp, path)
    finally:
        plt.close(fig)
