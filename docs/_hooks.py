"""MkDocs hook: an API reference page for every framework backend that exists.

The backends (``gradand/backends/torch.py``, ``jax``, ``tensorflow``, as
modules or packages) land independently. For each one present in the source
tree, this hook adds ``api/backends/<name>.md`` rendering ``gradand.backends.<name>``
with mkdocstrings, and lists it under "API reference" in the navigation, so the
reference always covers every public module without anyone editing the nav.
Discovery reads file names only; no framework is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ROOT / "gradand" / "backends"

#: Display names, in navigation order; any other backend follows, by name.
TITLES = {"torch": "PyTorch", "jax": "JAX", "tensorflow": "TensorFlow"}


def backend_modules() -> list[str]:
    """Names of the backend modules or packages in ``gradand/backends``."""
    names = set()
    for p in BACKENDS.iterdir():
        if p.name.startswith("_"):
            continue
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()):
            names.add(p.stem)
    order = list(TITLES)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def public_submodules(name: str) -> list[str]:
    """Public modules inside a backend package (e.g. ``tensorflow.xp``), by name."""
    package = BACKENDS / name
    if not package.is_dir():
        return []
    return sorted(
        p.stem
        for p in package.iterdir()
        if not p.name.startswith("_") and (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
    )


def page_source(name: str) -> str:
    title = TITLES.get(name, name)
    parts = [
        f"# {title} backend\n\n"
        f"`gradand.backends.{name}` adapts the core to {title}: it turns {title}'s gradients into "
        f"the core's arrays and back, and never re-implements a combiner's math. "
        f"Import it explicitly; importing `gradand` imports no framework.\n\n"
        f"::: gradand.backends.{name}\n"
        f"    options:\n"
        f"      show_if_no_docstring: true\n"
    ]
    for sub in public_submodules(name):
        parts.append(f"\n::: gradand.backends.{name}.{sub}\n")
    return "".join(parts)


def on_config(config: Any, **kwargs: Any) -> Any:
    nav = config.get("nav") or []
    for section in nav:
        if isinstance(section, dict) and "API reference" in section:
            entries = section["API reference"]
            listed = {str(v) for e in entries if isinstance(e, dict) for v in e.values()}
            for name in backend_modules():
                uri = f"api/backends/{name}.md"
                if uri not in listed:
                    entries.append({f"{TITLES.get(name, name)} backend": uri})
    return config


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    for name in backend_modules():
        uri = f"api/backends/{name}.md"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=page_source(name)))
    return files
