"""Screenshot an HTML report with headless Chromium (Debian's `chromium` package), e.g. for docs/report.png:

make demo && python scripts/screenshot.py out/demo-report.html docs/report.png
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Flags that work in a root container with no display, no D-Bus and no network.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: python scripts/screenshot.py REPORT.html OUT.png [width×height from the page]", file=sys.stderr)
        return 2
    report, png = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium is not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as profile:
        command = [browser, *FLAGS, f"--user-data-dir={profile}", "--window-size=1100,1900", f"--screenshot={png}"]
        subprocess.run([*command, report.as_uri()], check=True, capture_output=True, timeout=120)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
