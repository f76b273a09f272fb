"""Render the README's pictures from a finished run (needs chromium on PATH):

    python docs/img/make_images.py runs/<id> [runs/<other> ...]

live-view.png: the terminal live view as `fedge simulate` draws it mid-round (rich, recorded
to SVG, rasterised by headless Chromium), with the run's real round lines above it.
report-page.png: the top of the `fedge report` page for the given runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from fedge import progress, reporting
from fedge.cli import _round_line

HERE = Path(__file__).resolve().parent


def _screenshot(url: str, out: Path, size: str) -> None:
    browser = next(p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=120)


def live_view(run_dir: Path, out: Path) -> None:
    rows = reporting.read_rows(run_dir)
    shown = rows[:-1]  # the view as it looks during the last round
    # Replay the run's own round times so elapsed and ETA read as they did.
    t = [0.0]
    progress.time.monotonic = lambda: t[0]  # a one-off renderer, not library code
    live = Console(width=150, force_terminal=True, file=open(os.devnull, "w"))
    view = progress.LiveView(len(rows) - 1, console=live)
    view.t0 = view.round_t0 = 0.0
    with view:
        for row in shown:
            t[0] += row["seconds"]
            view.round_done(row)
        t[0] += 0.6 * rows[-1]["seconds"]
        view.on_event({"phase": "train", "received": max(1, 2 * rows[-1]["sampled"] // 3),
                       "expected": rows[-1]["sampled"]})
        bar = view._progress.get_renderable()
        # What a person sees: the round lines so far, then the live bar under them.
        shot = Console(record=True, width=150, force_terminal=True, file=open(os.devnull, "w"))
        for row in shown:
            shot.print(_round_line(row), markup=False, highlight=False)
        shot.print(bar)
    svg = HERE / "live-view.svg"
    shot.save_svg(str(svg), title="fedge simulate")
    _screenshot(svg.as_uri(), out, "1300,260")
    svg.unlink()


def main(argv: list[str]) -> None:
    runs = [Path(a) for a in argv] or sys.exit(__doc__)
    live_view(runs[0], HERE / "live-view.png")
    with tempfile.TemporaryDirectory() as tmp:
        page = reporting.write_html(runs, Path(tmp), title="fedge report")
        _screenshot(page.as_uri(), HERE / "report-page.png", "1200,1400")
    print(f"wrote {HERE / 'live-view.png'} and {HERE / 'report-page.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
