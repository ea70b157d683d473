"""Griffe extension for the docs build: Google-style docstrings with reST leftovers.

gradand's docstrings are Google style with a singular ``Example:`` heading and
occasional reST roles (``:func:`gradand.finalize```). Griffe's Google parser
only recognises the plural ``Examples:`` as an examples section; the singular
would become a generic admonition whose ``>>>`` lines Markdown renders as
nested block quotes. This extension, loaded only by ``mkdocs.yml``, rewrites
both before a docstring is parsed:

- ``Example:`` becomes ``Examples:``, so doctests render as Python sessions;
- ``:class:`X```, ``:func:`~a.b.X``` and friends become cross-references to
  the object when griffe knows it (plain code otherwise);
- an ``Args:`` entry that documents several parameters at once
  (``b1, b2: Adam's decay rates.``, possibly wrapped over lines) becomes one
  entry per parameter with the same description.

It changes nothing in the package.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`(~?)([\w.]+)`")
_ARGS = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Keyword Args|Other Parameters):\s*$")
_GROUPED = re.compile(r"^(\w+(?:\s*,\s*\w+)+)\s*:\s*(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_args(text: str) -> str:
    """One ``name: description`` entry per parameter in every ``Args:`` section."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        header = _ARGS.match(lines[i])
        i += 1
        if not header:
            continue
        section_indent = len(header.group(1))
        item_indent = None
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > section_indent):
            line = lines[i]
            if not line.strip() or (item_indent is not None and _indent(line) > item_indent):
                out.append(line)
                i += 1
                continue
            item_indent = _indent(line)
            head, j = line.strip(), i + 1
            while (
                head.endswith(",") and ":" not in head and j < len(lines) and _indent(lines[j]) > item_indent
            ):
                head += " " + lines[j].strip()
                j += 1
            body = []
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) > item_indent:
                body.append(lines[j])
                j += 1
            grouped = _GROUPED.match(head)
            if grouped:
                for name in re.split(r"\s*,\s*", grouped.group(1)):
                    out.append(" " * item_indent + f"{name}: {grouped.group(2)}".rstrip())
                    out.extend(body)
            else:
                out.append(line)
                out.extend(lines[i + 1 : j])
            i = j
    return "\n".join(out)


def _resolve(target: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str | None:
    module = obj.path if obj.is_module else obj.module.path
    scopes = [obj.path, module, *(module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1))]
    for candidate in [target, *(f"{scope}.{target}" for scope in scopes)]:
        try:
            loader.modules_collection[candidate]
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        return candidate
    return None


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` sections and turn reST roles into cross-references."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None:
            return

        def role(match: re.Match[str]) -> str:
            short, target = match.group(1), match.group(2)
            shown = target.rsplit(".", 1)[-1] if short else target
            code = f"<code>{html.escape(shown)}</code>"
            path = _resolve(target, obj, loader)
            if path is None:
                return code
            return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

        text = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
        text = split_grouped_args(text)
        obj.docstring.value = _ROLE.sub(role, text)
