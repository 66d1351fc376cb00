"""The HTML report as a person sees it, in a real browser (headless Chromium from the system's
packages; skipped with a message where it is missing): one at-a-glance table, long unbroken model
text wrapped inside its cell, plots not shrunk until their text is unreadable, a one-stage funnel
said in words, no console errors. The browser runs a small script on the page and writes what it
measured into the page title, which --dump-dom gives back."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from engine.core import document, plots

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

PROBE = """
<script>
window.addEventListener("load", () => {
  const heads = [...document.querySelectorAll("h2, h3")].map(h => h.textContent);
  const cells = [...document.querySelectorAll("td")];
  const imgs = [...document.querySelectorAll("img")];
  document.title = "PROBE" + JSON.stringify({
    glance: heads.filter(t => t.startsWith("At a glance")).length,
    overflowing: cells.filter(td => td.scrollWidth > td.clientWidth + 2).length,
    cells: cells.length,
    page_overflow: document.documentElement.scrollWidth > window.innerWidth + 2,
    image_scale: imgs.map(i => i.naturalWidth ? i.width / i.naturalWidth : 1),
  }) + "PROBE";
});
</script>
"""


def measure(page, tmp_path) -> dict:
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"]
    dom = subprocess.run([*cmd, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"PROBE(\{.*?\})PROBE", dom.stdout)
    assert found, dom.stderr[-2000:]
    subprocess.run([*cmd, f"--screenshot={tmp_path / 'report.png'}", probed.as_uri()], capture_output=True, timeout=120)
    return json.loads(found.group(1))


pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium here (apt-get install chromium)")


def test_long_unbroken_text_wraps_inside_its_cell_and_panels_stay_readable(tmp_path):
    long_word = "x" * 900  # a model that emits one endless token
    charts = [(f"series {i}", {"a": ([1, 2, 3], [0.1 * i, 0.2, 0.3])}) for i in range(4)]
    blocks = [
        document.Heading("A table"),
        document.Grid(["id", "reply"], [["r1", long_word], ["r2", "short " + long_word[:300]]]),
        document.Image("panels.png", plots.panels(None, charts, title="four panels"), "four panels"),
    ]
    document.write_report(tmp_path, "hostile", blocks)
    seen = measure(tmp_path / "report.html", tmp_path)
    assert seen["cells"] == 4 and seen["overflowing"] == 0 and not seen["page_overflow"], seen
    assert all(s >= 0.5 for s in seen["image_scale"]), seen  # shrunk by half at most: its text stays readable


@pytest.mark.slow
def test_the_flagship_report_in_a_browser(reduced_flagship, tmp_path):
    seen = measure(reduced_flagship / "report.html", tmp_path)
    assert seen["glance"] == 1, seen  # once, at the top
    assert seen["overflowing"] == 0 and not seen["page_overflow"], seen
    assert all(s >= 0.5 for s in seen["image_scale"]), seen
