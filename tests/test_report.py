"""`--report`: one self-contained HTML file, checked for what it loads and, in headless Chromium, for what renders."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from pipeline.sinks import open_sink

from .helpers import ROOT, cli, label, reviews, write_csv
from .test_cli import label_args

SAMPLE = ROOT / "configs" / "sample_reviews.csv"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags that work in a root container with no display, no D-Bus and no network.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)  # fmt: skip
# Measures the rendered page and writes the result into it, for --dump-dom to carry out.
PROBE = """<script>
addEventListener("load", () => {
  const box = (e) => e.getBoundingClientRect();
  const out = {
    title: document.title,
    sections: [...document.querySelectorAll("section")].map((s) => s.id),
    cells: [...document.querySelectorAll("#confusion td")].map((c) => ({
      n: Number(c.dataset.count), w: box(c).width, h: box(c).height, bg: getComputedStyle(c).backgroundColor })),
    bars: [...document.querySelectorAll("rect.bar")].map((r) => ({ w: box(r).width, h: box(r).height })),
    svgs: [...document.querySelectorAll("svg")].map((s) => ({ w: box(s).width, h: box(s).height })),
    cards: [...document.querySelectorAll(".card")].map((c) => c.innerText),
    overflow: document.documentElement.scrollWidth > window.innerWidth,
  };
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.append(pre);
});
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with a fresh profile; skip the test where Chromium is not installed."""
    if CHROMIUM is None:
        pytest.skip(
            "chromium is not installed, so the report's rendering is not checked: `make test` installs Debian's "
            "chromium package with apt-get where it can (root on Debian)"
        )
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1100,1800", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def rendered(report: Path, tmp_path: Path) -> dict[str, Any]:
    """What Chromium laid out for `report`: a copy with the probe (and a CSP that lets it run) is loaded."""
    page = report.read_text(encoding="utf-8")
    page = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = chromium("--dump-dom", "--virtual-time-budget=5000", probed.as_uri(), profile=tmp_path / "profile")
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, result.stderr[-2000:]
    return dict(json.loads(html.unescape(found.group(1))))


def png_size_and_colours(path: Path) -> tuple[int, int, int]:
    """Width, height and how many distinct byte values its pixel data holds (a blank page has very few)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20]), int.from_bytes(data[20:24])
    chunks, at = [], 8
    while at < len(data):
        size = int.from_bytes(data[at : at + 4])
        if data[at + 4 : at + 8] == b"IDAT":
            chunks.append(data[at + 8 : at + 8 + size])
        at += size + 12
    return width, height, len(set(zlib.decompress(b"".join(chunks))))


@pytest.fixture
def evaluated(sim: Any, tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The sample labeled over HTTP, evaluated against its gold column with a report: (sink, report, JSON)."""
    out = tmp_path / "out.jsonl"
    assert cli(*label_args(sim, SAMPLE, out)).returncode == 0
    report = tmp_path / "report.html"
    result = cli("eval", str(out), "--gold", str(SAMPLE), "--gold-column", "gold", "--json", "--report", str(report))
    assert result.returncode == 0, result.stderr
    return out, report, json.loads(result.stdout)


def test_the_report_loads_nothing_from_anywhere(evaluated: tuple[Path, Path, dict[str, Any]]) -> None:
    """One file: no script, stylesheet, image, font or frame to fetch, and a policy that forbids fetching any."""
    page = evaluated[1].read_text(encoding="utf-8")
    assert "default-src 'none'" in page
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|\bhref=|url\(|@import", page)


@pytest.mark.browser
def test_chromium_renders_heatmap_charts_and_figures(
    evaluated: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    """In headless Chromium every section lays out: a 3×3 heatmap whose cells hold the confusion counts with the
    diagonal shaded green, bars with real size, the eval figures in the summary cards, nothing overflowing."""
    _, report, data = evaluated
    page = rendered(report, tmp_path)
    assert page["sections"] == ["summary", "confusion", "scores", "labels", "confidence", "cost"]
    cells = page["cells"]
    assert [c["n"] for c in cells] == [n for row in data["confusion"]["matrix"] for n in row]
    assert all(c["w"] > 30 and c["h"] > 15 for c in cells)
    diagonal = [cells[i * 4]["bg"] for i in range(3)]
    assert all(re.match(r"rgb\((\d+), (\d+), (\d+)\)", bg) for bg in diagonal)
    assert all(int(bg.split(",")[1]) > int(bg.split(",")[0][4:]) for bg in diagonal)  # greener than red
    grown = [b for b in page["bars"] if b["w"] > 0 and b["h"] > 0]
    assert len(grown) >= 6 + 5  # predicted and gold bars for three labels, several confidence bins
    assert all(s["w"] > 100 and s["h"] > 50 for s in page["svgs"])
    assert any(f"{data['accuracy']:.3f}" in card and "accuracy" in card for card in page["cards"])
    assert not page["overflow"]

    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", report.as_uri(), profile=tmp_path / "profile2")
    width, height, colours = png_size_and_colours(shot)
    assert (width, height) == (1100, 1800)
    assert colours > 100  # text, shades and charts, not a blank page


def test_status_writes_a_report_of_a_finished_run_only(sim: Any, tmp_path: Path) -> None:
    """status --report refuses while a run holds the sink, and afterwards writes the figures that need no gold."""
    out = tmp_path / "out.parquet"
    label(sim, write_csv(tmp_path / "in.csv", reviews(30)), out)
    report = tmp_path / "status.html"
    holder = open_sink(out).meta
    holder.lock()
    try:
        refused = cli("status", str(out), "--report", str(report))
    finally:
        holder.unlock()
    assert refused.returncode == 2 and "write it when the run has ended" in refused.stderr
    assert not report.exists()
    done = cli("status", str(out), "--report", str(report))
    assert done.returncode == 0, done.stderr
    page = report.read_text(encoding="utf-8")
    assert 'id="confusion"' not in page
    for section in ('id="labels"', 'id="confidence"', 'id="cost"', "30</b><span>rows labeled"):
        assert section in page
