"""Plots, report.md and the comparison page, from metrics rows with known values.

The page is checked in a real headless Chromium over the DevTools protocol: it loads,
every image decodes (naturalWidth > 0), and the console stays free of errors.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fedge import reporting


def _rows(n_rounds: int, *, loss0: float, rate: float, dp: bool, rejected_at: int | None = None) -> list[dict]:
    """Round t: central loss loss0·rate^t (closed form), train loss 0.1 above it, 1 MiB up per client."""
    rows = [{"round": 0, "central_loss": loss0, "central_accuracy": None, "seconds": 1.0}]
    for t in range(1, n_rounds + 1):
        rows.append({
            "round": t, "sampled": 4, "accepted": 4 - (t == rejected_at), "rejected": int(t == rejected_at),
            "rejected_reasons": ["norm bound"] if t == rejected_at else [], "updated": True,
            "train_loss": loss0 * rate**t + 0.1, "local_eval_loss": None, "local_eval_accuracy": None,
            "central_loss": loss0 * rate**t, "central_accuracy": None,
            "bytes_up": 4 * 2**20, "bytes_down": 4 * 2**20, "bytes_up_per_client": 2**20,
            "bytes_down_per_client": 2**20, "epsilon_user": 0.5 * t if dp else None, "epsilon_record_max": None,
            "seconds": 2.0,
        })
    return rows


def _run(path: Path, rows: list[dict], **summary) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def _summary(rows, **kw):
    return {"scenario": "s", "strategy": kw.get("strategy", "fedavg"), "rounds": rows[-1]["round"],
            "base_model": "tiny", "base_hash": "ab" * 32, "initial_central_loss": rows[0]["central_loss"],
            "final_central_loss": rows[-1]["central_loss"], "wall_seconds": 12.0, **kw}


def test_run_report_embeds_the_plots_that_have_data(tmp_path):
    # Prepare: no accuracy column, no DP, one rejected reply in round 2
    rows = _rows(3, loss0=4.0, rate=0.5, dp=False, rejected_at=2)
    run = _run(tmp_path / "run", rows)
    summary = _summary(rows, samples=[{"prompt": "Who wrote Hamlet?", "reference": "Shakespeare.",
                                       "source": "held-out, category literature", "base": "A poet.",
                                       "finetuned": "Shakespeare.", "base_loss": 3.2, "finetuned_loss": 1.1}])
    # Execute
    report = reporting.write_run_report(run, summary, rows[1:]).read_text()
    # Assert: exactly the plots with data, each a decodable image, each embedded in report.md
    from matplotlib.image import imread

    drawn = sorted(p.stem for p in (run / "plots").glob("*.png"))
    assert drawn == ["bytes", "heldout_loss", "rejected", "train_loss"]
    for stem in drawn:
        img = imread(run / "plots" / f"{stem}.png")
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # not blank
        assert f"(plots/{stem}.png)" in report
    assert "| 2 | 3 | 1 | 1.1000 |" in report  # round 2: 3 accepted, 1 rejected, train loss 4·0.25 + 0.1
    assert "4.0000 → 0.5000" in report  # 4·0.5^3
    assert "reference: Shakespeare." in report and "(loss of the reference 1.10)" in report


def test_several_runs_on_the_same_axes(tmp_path):
    # Prepare: two runs (one with user-level DP) that share a directory name
    a_rows, b_rows = _rows(2, loss0=4.0, rate=0.5, dp=False), _rows(3, loss0=4.0, rate=0.9, dp=True)
    a = _run(tmp_path / "fedavg" / "seed-0", a_rows, **_summary(a_rows))
    b = _run(tmp_path / "dp" / "seed-0", b_rows, **_summary(b_rows, strategy="fedavg+dp"))
    # Execute
    page = reporting.write_html([a, b], tmp_path / "out").read_text()
    # Assert: ε is plotted because one run has it; both runs are in the tables, named apart
    drawn = sorted(p.stem for p in (tmp_path / "out" / "plots").glob("*.png"))
    assert drawn == ["bytes", "epsilon", "heldout_loss", "rejected", "train_loss"]
    assert page.count("data:image/png;base64,") == len(drawn)
    assert "fedavg/seed-0" in page and "dp/seed-0" in page
    assert f"4.0000 → {4.0 * 0.9**3:.4f}" in page and "4.0000 → 1.0000" in page
    assert f"<td>{1.5:.3f}</td>" in page  # ε after round 3 = 0.5·3


def test_a_directory_without_metrics_is_named(tmp_path):
    with pytest.raises(reporting.ReportError, match="nowhere"):
        reporting.write_html([tmp_path / "nowhere"], tmp_path / "out")


# -- the page in a real browser ---------------------------------------------------------

def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _DevTools:
    """The minimum of the Chrome DevTools protocol: send commands, collect events."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg.get("result", {})
            self.events.append(msg)

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                break


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian/Ubuntu: apt-get install -y chromium)")
    pytest.importorskip("websockets", reason="the DevTools client needs 'websockets' (the dev extra)")
    import urllib.request

    # Prepare: a two-run page
    a_rows, b_rows = _rows(2, loss0=4.0, rate=0.5, dp=False), _rows(2, loss0=4.0, rate=0.8, dp=True)
    a = _run(tmp_path / "a", a_rows, **_summary(a_rows))
    b = _run(tmp_path / "b", b_rows, **_summary(b_rows))
    page = reporting.write_html([a, b], tmp_path / "out")
    port = _free_port()
    proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-extensions", "--disable-dev-shm-usage", f"--remote-debugging-port={port}",
                             f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, targets = time.monotonic() + 60, None
        while time.monotonic() < deadline and not targets:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    targets = [t for t in json.load(r) if t.get("type") == "page"]
            except OSError:
                time.sleep(0.3)
        assert targets, "chromium did not open its DevTools port within 60 s"
        cdp = _DevTools(targets[0]["webSocketDebuggerUrl"])
        # Execute: load the page, let it settle, ask the DOM
        for domain in ("Runtime", "Log", "Page"):
            cdp.call(f"{domain}.enable")
        cdp.call("Page.navigate", url=page.resolve().as_uri())
        cdp.drain(0.5)
        for _ in range(100):
            state = cdp.call("Runtime.evaluate", expression="document.readyState", returnByValue=True)
            if state["result"]["value"] == "complete":
                break
            time.sleep(0.1)
        images = cdp.call("Runtime.evaluate", returnByValue=True, expression=(
            "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"))
        cells = cdp.call("Runtime.evaluate", returnByValue=True,
                         expression="document.querySelectorAll('table td').length")
        cdp.drain(0.5)
        cdp.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Assert: it loaded, every plot decoded at its drawn size, tables rendered, no console errors
    imgs = images["result"]["value"]
    assert len(imgs) == len(list((tmp_path / "out" / "plots").glob("*.png"))) == 5
    for alt, complete, w, h in imgs:
        assert complete and w == 640 and h == 360, (alt, w, h)  # 6.4 x 3.6 in at 100 dpi
    assert cells["result"]["value"] > 0
    errors = [e for e in cdp.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, errors


def test_client_spread_is_the_quantiles_of_the_clients_and_is_plotted(tmp_path, flower_identity):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedge import protocol as P
    from strategies import build

    # Prepare: five evaluation replies with known accuracies (one failed reply is skipped), example counts 1..5
    acc = [0.2, 0.9, 0.5, 0.4, 0.7]
    strategy = build("fedavg", clients_per_round=2, evaluate_clients_per_round=5, min_replies=1)
    asked = Message(RecordDict({P.CONFIG: ConfigRecord({})}), dst_node_id=1, message_type="evaluate")
    replies = [Message(RecordDict({P.METRICS: MetricRecord({P.M_NUM_EXAMPLES: i + 1, P.M_EVAL_LOSS: 1.0 - a,
                                                            P.M_EVAL_ACC: a})}), reply_to=asked)
               for i, a in enumerate(acc)]
    # Execute
    out = strategy.aggregate_evaluate(3, replies)
    # Assert (oracle: numpy's linear quantiles over clients, unweighted; the mean stays example-weighted)
    q = np.quantile(acc, [0, 0.25, 0.75, 1])
    assert [out[f"{P.M_EVAL_ACC}-{n}"] for n in ("min", "q25", "q75", "max")] == pytest.approx(q)
    assert out[P.M_EVAL_ACC] == pytest.approx(np.average(acc, weights=[1, 2, 3, 4, 5]))
    assert out[f"{P.M_EVAL_LOSS}-max"] == pytest.approx(0.8)

    # Prepare: rows carrying the spread; Execute: the report; Assert: the spread plot is drawn and embedded
    rows = _rows(3, loss0=4.0, rate=0.5, dp=False)
    for r in rows[1:]:
        r.update(local_eval_accuracy=0.5 + 0.1 * r["round"], local_eval_accuracy_min=0.2,
                 local_eval_accuracy_q25=0.4, local_eval_accuracy_q75=0.6 + 0.1 * r["round"],
                 local_eval_accuracy_max=0.95)
    run = _run(tmp_path / "run", rows)
    report = reporting.write_run_report(run, _summary(rows), rows[1:]).read_text()
    assert "(plots/client_spread.png)" in report
    from matplotlib.image import imread

    assert imread(run / "plots" / "client_spread.png").std() > 0


def test_client_spread_is_withheld_under_user_level_dp():
    from fedge import config as fcfg
    from server.federation import publishable_row

    # Prepare: a row with the spread, under user-level DP and without
    row = {"round": 1, "local_eval_accuracy_min": 0.1, "local_eval_loss_max": 3.0, "central_accuracy": 0.5}
    # Execute / Assert: withheld under user-level DP, kept otherwise
    dp = publishable_row(row, fcfg.load("dp-user", []))
    assert dp["local_eval_accuracy_min"] is None and dp["local_eval_loss_max"] is None
    assert dp["central_accuracy"] == 0.5
    assert publishable_row(row, fcfg.load("reuters", []))["local_eval_accuracy_min"] == 0.1
