"""What a person looks at after a run: plots, ``report.md``, and a comparison page.

Every plot is a function of ``metrics.jsonl`` rows (one per round, round 0 = the base
model) and is drawn for one run or for several runs on the same axes:

    heldout_loss.png   central held-out loss per round (dashed: mean over sampled clients' local sets)
    accuracy.png       central (and local) held-out accuracy, when the task has one
    train_loss.png     mean local train loss of the accepted clients (withheld under DP-SGD)
    epsilon.png        ε spent so far, when a DP mechanism is on (user-level; record-level max over clients)
    bytes.png          MiB up (solid) and down (dashed) per round, all clients together
    rejected.png       replies rejected by validation per round

``fedge report RUN [RUN ...]`` writes ``index.html`` (plots inlined as data: URIs, so the
single file opens offline) with a summary table and each run's per-round table.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

MIB = 2**20


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message names it."""


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ReportError(f"{run_dir}: not a fedge run directory (no metrics.jsonl)")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def read_run(run_dir: Path) -> dict:
    """rows, summary (may be empty: an unfinished run) and a label for legends."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"dir": run_dir, "label": run_dir.name, "rows": rows, "summary": summary}


def _series(rows: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key] / scale) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _any(runs: list[dict], *keys: str) -> bool:
    return any(r.get(k) is not None for run in runs for r in run["rows"] for k in keys)


# (file stem, title, y label, [(metrics key, line style, legend suffix, scale)], drawn when)
_PLOTS = [
    ("heldout_loss", "Held-out loss", "loss (mean per example)",
     [("central_loss", "-", "central", 1.0), ("local_eval_loss", "--", "clients' local", 1.0)], None),
    ("accuracy", "Held-out accuracy", "accuracy",
     [("central_accuracy", "-", "central", 1.0), ("local_eval_accuracy", "--", "clients' local", 1.0)],
     ("central_accuracy", "local_eval_accuracy")),
    ("train_loss", "Train loss (mean over accepted clients)", "loss", [("train_loss", "-", "", 1.0)],
     ("train_loss",)),
    ("epsilon", "Privacy spent (ε so far)", "ε",
     [("epsilon_user", "-", "user-level", 1.0), ("epsilon_record_max", "--", "record-level, max client", 1.0)],
     ("epsilon_user", "epsilon_record_max")),
    ("bytes", "Traffic per round (all clients)", "MiB",
     [("bytes_up", "-", "up", MIB), ("bytes_down", "--", "down", MIB)], None),
    ("rejected", "Rejected replies per round", "replies", [("rejected", "-", "", 1.0)], None),
]


def draw_plots(runs: list[dict], out_dir: Path) -> list[tuple[str, Path]]:
    """Draw every plot that has data into ``out_dir``; return [(title, path)]."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe off the main thread
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = []
    for stem, title, ylabel, lines, when in _PLOTS:
        if when is not None and not _any(runs, *when):
            continue
        fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            for key, style, suffix, scale in lines:
                x, y = _series(run["rows"], key, scale)
                if not x:
                    continue
                label = " · ".join(p for p in ((run["label"] if len(runs) > 1 else ""), suffix) if p) or None
                ax.plot(x, y, style, color=color, marker="o", markersize=4, label=label)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if stem == "rejected":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))  # all zeros: 0..1, not 0..0.05
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize="small")
        path = out_dir / f"{stem}.png"
        fig.savefig(path, metadata={"Software": None})
        drawn.append((title, path))
    spread = _draw_client_spread(runs, out_dir)
    if spread is not None:
        drawn.append(spread)
    return drawn


def _draw_client_spread(runs: list[dict], out_dir: Path) -> tuple[str, Path] | None:
    """Local held-out accuracy (loss for causal LMs) across the evaluating clients per round:
    the example-weighted mean, the middle half of the clients (q25–q75, shaded) and min/max (dotted)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    what = "accuracy" if _any(runs, "local_eval_accuracy_min") else "loss"
    if not _any(runs, f"local_eval_{what}_min"):
        return None
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        color, rows = f"C{i % 10}", [r for r in run["rows"] if r.get(f"local_eval_{what}_min") is not None]
        x = [r["round"] for r in rows]
        name = run["label"] if len(runs) > 1 else "clients"
        ax.plot(x, [r[f"local_eval_{what}"] for r in rows], "-", color=color, marker="o", markersize=4,
                label=f"{name}: mean")
        ax.fill_between(x, [r[f"local_eval_{what}_q25"] for r in rows], [r[f"local_eval_{what}_q75"] for r in rows],
                        color=color, alpha=0.25, label=f"{name}: middle half")
        for q in ("min", "max"):
            ax.plot(x, [r[f"local_eval_{what}_{q}"] for r in rows], ":", color=color,
                    label=f"{name}: min / max" if q == "min" else None)
    title = f"Local held-out {what} across clients"
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(what)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path = out_dir / "client_spread.png"
    fig.savefig(path, metadata={"Software": None})
    return title, path


def _f(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)


def write_run_report(run_dir: Path, summary: dict, history: list[dict]) -> Path:
    """``report.md`` of one run with its plots (``plots/*.png``) embedded."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    plots = draw_plots([run], run_dir / "plots")
    lines = [f"# Run {run_dir.name}", "", f"Scenario `{summary['scenario']}`, strategy `{summary['strategy']}`, "
             f"{summary['rounds']} rounds, base `{summary['base_model']}` (sha256 {summary['base_hash'][:12]}).", "",
             "| round | accepted | rejected | train loss | local held-out loss | central loss | bytes up/client | s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in history:
        lines.append(f"| {r['round']} | {r['accepted']} | {r['rejected']} | {_f(r['train_loss'])} | "
                     f"{_f(r['local_eval_loss'])} | {_f(r['central_loss'])} | {r['bytes_up_per_client']:.0f} | "
                     f"{r['seconds']:.1f} |")
    lines += ["", f"Central held-out loss: {summary['initial_central_loss']:.4f} → {summary['final_central_loss']:.4f}.",
              ""]
    lines += [f"![{title}](plots/{path.name})" for title, path in plots]
    lines += sample_markdown(summary)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def sample_markdown(summary: dict) -> list[str]:
    samples = summary.get("samples") or []
    if not samples:
        return []
    out = ["", "## Sample answers", ""]
    for s in samples:
        out += [f"**Prompt** ({s.get('source', '')}): {one_line(s['prompt'])}", ""]
        if s.get("reference") is not None:
            out.append(f"- reference: {one_line(s['reference'])}")
        out += [f"- base{_loss_note(s.get('base_loss'))}: {s['base']}",
                f"- fine-tuned{_loss_note(s.get('finetuned_loss'))}: {s['finetuned']}", ""]
    return out


def one_line(text: str) -> str:
    """Whitespace (newlines in a code answer, say) collapsed: one table cell, one bullet."""
    return " ".join(str(text).split())


def _loss_note(v) -> str:
    return "" if v is None else f" (loss of the reference {v:.2f})"


# -- the comparison page -------------------------------------------------------------


def _summary_row(run: dict) -> dict:
    s, rows = run["summary"], run["rows"]
    last = rows[-1] if rows else {}
    priv = s.get("privacy", {})
    eps = []
    if isinstance(priv.get("user_level"), dict):
        eps.append(f"user {priv['user_level']['epsilon']:.2f}")
    if isinstance(priv.get("record_level"), dict):
        eps.append(f"record ≤ {max(priv['record_level']['epsilon'].values()):.2f}")
    return {
        "run": run["label"], "scenario": s.get("scenario", "—"), "strategy": s.get("strategy", "—"),
        "rounds": str(max((r["round"] for r in rows), default=0)),
        "held-out loss": f"{_f(rows[0].get('central_loss') if rows else None)} → {_f(last.get('central_loss'))}",
        "accuracy": _f(last.get("central_accuracy"), ".3f"),
        "ε": ", ".join(eps) or ("none" if priv else "—"),
        "MiB up": f"{sum(r.get('bytes_up') or 0 for r in rows) / MIB:.2f}",
        "rejected": str(sum(r.get("rejected") or 0 for r in rows)),
        "wall s": _f(s.get("wall_seconds"), ".0f"),
    }


_ROUND_COLS = [("round", "d"), ("accepted", "d"), ("rejected", "d"), ("train_loss", ".4f"),
               ("local_eval_loss", ".4f"), ("central_loss", ".4f"), ("central_accuracy", ".3f"),
               ("epsilon_user", ".3f"), ("epsilon_record_max", ".3f"), ("bytes_up", ",d"), ("seconds", ".1f")]


def _table(header: list[str], body: list[list[str]]) -> str:
    e = html.escape
    return ("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body)
            + "</tbody></table>")


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
        "td:first-child,th:first-child{text-align:left}.plots img{max-width:49%;height:auto}"
        "blockquote{color:#444}")


def write_html(run_dirs: list[Path], out_dir: Path, *, title: str | None = None) -> Path:
    """``out_dir/index.html`` (self-contained) and ``out_dir/plots/*.png`` comparing ``run_dirs``."""
    if not run_dirs:
        raise ReportError("fedge report: give at least one run directory")
    runs = [read_run(Path(d)) for d in run_dirs]
    names = [r["label"] for r in runs]
    for run in runs:  # two runs with one name (a/seed-0, b/seed-0): qualify them
        if names.count(run["label"]) > 1:
            run["label"] = f"{run['dir'].parent.name}/{run['dir'].name}"
    out_dir = Path(out_dir)
    plots = draw_plots(runs, out_dir / "plots")
    e = html.escape
    title = title or f"fedge: {len(runs)} run{'s' if len(runs) > 1 else ''}"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<link rel='icon' href='data:,'><style>{_CSS}</style></head><body><h1>{e(title)}</h1>",
             f"<p>Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from "
             + ", ".join(f"<code>{e(str(r['dir']))}</code>" for r in runs) + ".</p>"]
    rows = [_summary_row(r) for r in runs]
    parts += ["<h2>Summary</h2>", _table(list(rows[0]), [list(r.values()) for r in rows])]
    parts.append("<h2>Plots</h2><div class='plots'>")
    for t, path in plots:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<img alt='{e(t)}' title='{e(t)}' src='data:image/png;base64,{data}'>")
    parts.append("</div>")
    for run in runs:
        parts.append(f"<h2>Run {e(run['label'])}</h2>")
        cols = [c for c, _ in _ROUND_COLS if any(r.get(c) is not None for r in run["rows"])]
        spec = dict(_ROUND_COLS)
        parts.append(_table(cols, [[_f(r.get(c), spec[c]) for c in cols] for r in run["rows"]]))
        for s in run["summary"].get("samples") or []:
            parts.append(f"<p><b>Prompt</b>: {e(s['prompt'])}</p><blockquote>")
            if s.get("reference") is not None:
                parts.append(f"reference: {e(s['reference'])}<br>")
            parts.append(f"base{e(_loss_note(s.get('base_loss')))}: {e(s['base'])}<br>"
                         f"fine-tuned{e(_loss_note(s.get('finetuned_loss')))}: {e(s['finetuned'])}</blockquote>")
    parts.append("</body></html>")
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
