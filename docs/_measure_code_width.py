"""Measure, in a real browser, how many code lines of the built site are cut off.

Renders every page of a built site in headless Chromium at a given window width and,
for each code block in the content, compares the width of each line with the block's
visible width. Prints per page the code lines, the overflowing ones and how many
characters fit, then the overall fraction. Not a test (it needs Chromium); the test
``tests/test_docs_width.py`` checks the same from the CSS arithmetic.

    mkdocs build -d /tmp/site
    python docs/_measure_code_width.py /tmp/site --width 1400 [--verbose]
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_SCRIPT = r"""<script>
(function () {
  function run() {
    const res = [];
    document.querySelectorAll('.md-content pre > code').forEach((code) => {
      for (let el = code; el && el !== document.body; el = el.parentElement) {
        if (getComputedStyle(el).display === 'none') el.style.display = 'block';  // inactive tabs
      }
      const st = getComputedStyle(code);
      const avail = code.clientWidth - parseFloat(st.paddingLeft) - parseFloat(st.paddingRight);
      const lines = code.textContent.replace(/\n$/, '').split('\n');
      const probe = document.createElement('span');
      probe.style.whiteSpace = 'pre';
      code.appendChild(probe);
      probe.textContent = 'x'.repeat(100);
      const cw = probe.getBoundingClientRect().width / 100;
      const over = [];
      lines.forEach((l) => {
        probe.textContent = l;
        if (probe.getBoundingClientRect().width > avail + 0.5) over.push(l);
      });
      probe.remove();
      res.push({n: lines.length, over: over, fits: Math.floor(avail / cw)});
    });
    const o = document.createElement('div');
    o.id = '__measure';
    o.setAttribute('data-json', JSON.stringify(res));
    document.body.appendChild(o);
  }
  if (document.readyState === 'complete') run(); else window.addEventListener('load', run);
})();
</script>"""


def measure(site: Path, width: int, verbose: bool = False, chromium: str = "chromium") -> tuple[int, int]:
    total = over = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "site"
        shutil.copytree(site, work)
        for page in sorted(work.rglob("index.html")):
            page.write_text(
                page.read_text(encoding="utf-8").replace("</body>", _SCRIPT + "</body>"), encoding="utf-8"
            )
            dom = subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},2000",
                 "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
                capture_output=True, text=True, timeout=120,
            ).stdout  # fmt: skip
            found = re.search(r'id="__measure" data-json="([^"]*)"', dom)
            if not found:
                print(f"{page.relative_to(work)}: no result")
                continue
            blocks = json.loads(html.unescape(found.group(1)))
            n = sum(b["n"] for b in blocks)
            o = sum(len(b["over"]) for b in blocks)
            total, over = total + n, over + o
            fits = sorted({b["fits"] for b in blocks})
            print(f"{page.relative_to(work)!s:45s} lines {n:4d}  over {o:4d}  fits {fits}")
            if verbose:
                for b in blocks:
                    for line in b["over"]:
                        print(f"    {len(line):4d} {line}")
    print(f"total: {over} of {total} code lines overflow at {width} px ({100 * over / max(total, 1):.1f}%)")
    return over, total


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="a built site (mkdocs build -d SITE)")
    parser.add_argument("--width", type=int, default=1400, help="window width in px")
    parser.add_argument("--verbose", action="store_true", help="print every overflowing line")
    parser.add_argument("--chromium", default="chromium", help="the Chromium executable")
    args = parser.parse_args()
    measure(args.site, args.width, args.verbose, args.chromium)
