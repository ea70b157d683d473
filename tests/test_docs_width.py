"""Every code line of the documentation fits its code block in a 1400 px wide browser window.

A code line wider than its block is cut at the block's edge and needs a horizontal scrollbar
(the key comment of a line, `# instead of loss.backward()`, is then the part not seen). How many
characters fit is computed from the content grid's width in ``docs/stylesheets/extra.css`` and
mkdocs-material's layout at that window width (both sidebars shown). Rendering the built site
in headless Chromium at 1400 px agrees: its code blocks are 821 px wide and fit 100 characters
(80 with material's default 61rem grid).
"""

from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXTRA_CSS = DOCS / "stylesheets" / "extra.css"

WINDOW_PX = 1400
SCROLLBAR_PX = 15  # a classic (non-overlay) vertical scrollbar takes this much of the window

# mkdocs-material 9's layout for windows 76.25em to 100em wide (1220-1600 px):
ROOT_FONT_PX = 20.0  # html { font-size: 125% }
SIDEBARS_REM = 2 * 12.1  # .md-sidebar { width: 12.1rem }: navigation and table of contents
CONTENT_MARGINS_REM = 2 * 1.2  # .md-content__inner { margin-left/right: 1.2rem }
TEXT_REM = 0.8  # .md-typeset { font-size: .8rem }
CODE_EM = 0.85  # .md-typeset code { font-size: .85em }
CODE_PADDING_EM = 2 * 1.1764705882  # .md-typeset pre > code { padding: ... 1.1764705882em }
# Advance of one monospace character, in em: Roboto Mono 0.600, DejaVu Sans Mono and Menlo 0.602.
CHAR_EM = 0.602

#: Fenced blocks, as tests/test_docs_examples.py finds them (indented ones in tabs included).
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=ticks)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
#: Blocks drawn as pictures, not shown as code lines.
_NOT_CODE = {"mermaid"}


def grid_max_width_px() -> float:
    """The ``.md-grid`` max-width that extra.css sets, in px."""
    css = re.sub(r"/\*.*?\*/", "", EXTRA_CSS.read_text(encoding="utf-8"), flags=re.DOTALL)
    rule = re.search(r"\.md-grid\s*\{[^}]*?max-width:\s*([\d.]+)(rem|px)", css)
    assert rule, f"{EXTRA_CSS} sets no .md-grid max-width in rem or px"
    value, unit = float(rule.group(1)), rule.group(2)
    return value * ROOT_FONT_PX if unit == "rem" else value


def characters_that_fit(window_px: int = WINDOW_PX) -> int:
    """Monospace characters that fit on one line of a code block in the main column."""
    grid = min(window_px - SCROLLBAR_PX, grid_max_width_px())
    column = grid - (SIDEBARS_REM + CONTENT_MARGINS_REM) * ROOT_FONT_PX
    code_px = CODE_EM * TEXT_REM * ROOT_FONT_PX
    return math.floor((column - CODE_PADDING_EM * code_px) / (CHAR_EM * code_px))


def display_width(line: str) -> int:
    """Columns a line takes in a monospace font (wide East Asian characters take two)."""
    line = line.expandtabs(8)
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in line)


def code_lines() -> list[tuple[str, int, str]]:
    """(page, line number, code line) of every fenced code block under docs/."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        for block in _FENCE.finditer(text):
            language = (block["info"].strip().split() or [""])[0].lstrip(".").lower()
            if language in _NOT_CODE:
                continue
            first = text.count("\n", 0, block.start("body")) + 1
            indent = block["indent"]
            for i, line in enumerate(block["body"].splitlines()):
                line = line[len(indent) :] if line.startswith(indent) else line
                found.append((str(page.relative_to(ROOT)), first + i, line))
    return found


def test_extra_css_widening_the_content_is_registered_in_mkdocs_yml() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^extra_css:\s*\n(?:\s+-\s+.*\n)*?\s+-\s+stylesheets/extra\.css\s*$", config, re.M), (
        "mkdocs.yml must list stylesheets/extra.css under extra_css"
    )


def test_code_blocks_fit_100_characters_at_1400_px_and_material_default_fits_80() -> None:
    assert characters_that_fit() >= 100, f"only {characters_that_fit()} characters fit at {WINDOW_PX} px"
    # the same arithmetic on material's own 61rem grid gives the 80 that Chromium measures
    column = 61 * ROOT_FONT_PX - (SIDEBARS_REM + CONTENT_MARGINS_REM) * ROOT_FONT_PX
    code_px = CODE_EM * TEXT_REM * ROOT_FONT_PX
    assert math.floor((column - CODE_PADDING_EM * code_px) / (CHAR_EM * code_px)) == 80


def test_every_code_line_of_the_docs_fits_its_block_at_1400_px() -> None:
    limit = characters_that_fit()
    lines = code_lines()
    assert len(lines) > 500, "found too few code lines: is the fence pattern still right?"
    too_long = [
        f"{page}:{n}: {display_width(line)} > {limit}: {line}"
        for page, n, line in lines
        if display_width(line) > limit
    ]
    assert not too_long, (
        f"{len(too_long)} of {len(lines)} code lines are wider than the {limit} characters that fit at "
        f"{WINDOW_PX} px; wrap the code or shorten the comment:\n" + "\n".join(too_long)
    )


def test_the_width_check_catches_an_overlong_line() -> None:
    assert display_width("x" * (characters_that_fit() + 1)) > characters_that_fit()
    assert display_width("\t") == 8 and display_width("計") == 2
