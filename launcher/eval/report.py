"""Writing an evaluation report (notellm2.launcher.eval.evaluate.evaluate_runs): a printed table, JSON, a markdown
table, TensorBoard scalars and a PNG of Recall@K against K. Rows are runs, columns subsets x K."""
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
    """Subsets with queries in at least one run (an empty one, e.g. head/tail under the paper
    protocol, where no test note is in a training pair, stays in the JSON only)."""
    names: list[str] = []
    for run in report["runs"]:
        names += [s for s, v in run["subsets"].items() if s not in names and v["n"] > 0]
    return names


def _ks(report: dict) -> list[int]:
    return sorted({k for run in report["runs"] for k in run["ks"]})


def _cells(report: dict, with_ci: bool) -> tuple[list[str], list[list[str]]]:
    header = ["run"]
    cols = [(s, k) for s in _subsets(report) for k in _ks(report)]
    header += [f"{s} R@{_k_label(k)}" for s, k in cols]
    rows = []
    for run in report["runs"]:
        row = [run["name"]]
        for s, k in cols:
            sub = run["subsets"].get(s)
            v = None if sub is None else sub["recall"].get(str(k))
            if v is None:
                row.append("-")
            elif with_ci:
                lo, hi = sub["ci"][str(k)]
                row.append(f"{v:.3f} [{lo:.3f}, {hi:.3f}]")
            else:
                row.append(f"{v:.3f}")
        rows.append(row)
    return header, rows


def format_table(report: dict, with_ci: bool = False) -> str:
    """A fixed-width table for the terminal."""
    header, rows = _cells(report, with_ci)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header)] + [line(r) for r in rows])


def notes_lines(report: dict) -> list[str]:
    """What the table does not show: sizes, capped K, subset sizes, approximate-search recall."""
    out = [f"protocol {report['protocol']}: " + ", ".join(f"{k} {v}" for k, v in report["protocol_stats"].items())]
    for run in report["runs"]:
        sizes = ", ".join(f"{s} {v['n']}" for s, v in run["subsets"].items())
        line = f"{run['name']}: pool {run['pool_size']}, queries {run['num_queries']}"
        if run["num_skipped"]:
            line += f" (skipped {run['num_skipped']} pairs with a note not embedded)"
        if run["mean_rank"] is not None:
            line += f", mean target rank {run['mean_rank']:.1f}"
        if run["capped"]:
            line += f"; K capped at the pool size: {', '.join(_k_label(k) for k in run['capped'])}"
        if run.get("not_reported_approximate"):
            line += f"; not reported with {report['backend']}: {', '.join(map(_k_label, run['not_reported_approximate']))}"
        if run.get("faiss_recall_vs_exact") is not None:
            line += f"; {report['backend']} recall against exact search {run['faiss_recall_vs_exact']:.4f}"
        out += [line, f"  queries per subset: {sizes}"]
    b = report["bootstrap"]
    out.append(f"intervals: {int(b['level'] * 100)}% bootstrap over query notes, {b['resamples']} resamples, seed {b['seed']}")
    return out


def markdown_table(report: dict) -> str:
    header, rows = _cells(report, with_ci=True)
    md = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(md + [""] + [f"- {line.strip()}" for line in notes_lines(report)]) + "\n"


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)


def write_json(report: dict, path: str) -> None:
    _atomic_write(path, json.dumps(report, indent=2) + "\n")


def write_markdown(report: dict, path: str) -> None:
    _atomic_write(path, markdown_table(report))


def write_tensorboard(report: dict, log_dir: str) -> None:
    """One scalar per run, subset and K: tag `recall/<subset>/R@<K>`, step = K; one writer per run."""
    from torch.utils.tensorboard import SummaryWriter

    for run in report["runs"]:
        w = SummaryWriter(os.path.join(log_dir, run["name"]))
        try:
            for sub, v in run["subsets"].items():
                for k, r in v["recall"].items():
                    if r is not None:
                        w.add_scalar(f"recall/{sub}", r, global_step=int(k))
                        w.add_scalar(f"recall/{sub}/R@{_k_label(int(k))}", r, global_step=0)
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
            ks = [k for k in run["ks"] if sub and sub["recall"].get(str(k)) is not None]
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
        ax.set_ylabel(f"Recall@K ({subset})")
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
