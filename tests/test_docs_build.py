"""The documentation site builds in strict mode, and its API reference covers every public name."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="needs the docs extra (mkdocs-material, mkdocstrings[python])",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Build the site once, strictly, into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    return out, log


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _directives() -> set[str]:
    """Every ``::: dotted.path`` rendered by a hand-written API page."""
    found = set()
    for page in (DOCS / "api").rglob("*.md"):
        found |= set(re.findall(r"^:::\s+([\w.]+)\s*$", page.read_text(encoding="utf-8"), re.MULTILINE))
    return found


def _static_all(path: Path) -> list[str]:
    """A module's ``__all__``, read without importing it (backends import frameworks)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return list(ast.literal_eval(node.value))
    return []


def test_site_builds_in_strict_mode_without_warnings(site: tuple[Path, str]) -> None:
    out, log = site
    assert "WARNING" not in log, log
    for page in ["index.html", "concepts/index.html", "guide/index.html", "api/combiners/index.html"]:
        assert (out / page).is_file(), f"{page} missing from the built site"


def test_api_pages_render_every_directive_as_a_documented_object(site: tuple[Path, str]) -> None:
    out, _ = site
    html = "\n".join(p.read_text(encoding="utf-8") for p in (out / "api").rglob("*.html"))
    for path in _directives():
        assert f'id="{path}"' in html, f"::: {path} rendered no anchor"
    # doctest examples render as code, not as Markdown block quotes
    assert "&gt;&gt;&gt;" in html and "<blockquote>" not in html


def test_every_public_core_name_has_an_api_reference_entry() -> None:
    import gradand

    directives = _directives()
    missing = []
    for name in gradand.__all__:
        if name.startswith("__"):
            continue
        if f"gradand.{name}" not in directives:
            missing.append(f"gradand.{name}")
    for module in ["gradand.consistency", "gradand.temporal", "gradand.experiments.patchwork", "gradand.cli"]:
        if module not in directives:
            missing.append(module)
    assert not missing, f"no API reference entry (::: path) for {missing}"


def test_every_backend_module_gets_an_api_page_in_the_navigation(site: tuple[Path, str]) -> None:
    out, _ = site
    on_disk = sorted(
        p.stem
        for p in (ROOT / "gradand" / "backends").iterdir()
        if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py").exists())
    )
    assert sorted(_hooks().backend_modules()) == on_disk
    home = (out / "index.html").read_text(encoding="utf-8")
    for name in on_disk:
        assert (out / "api" / "backends" / name / "index.html").is_file(), f"no API page for {name}"
        assert f'href="api/backends/{name}/"' in home, f"the {name} backend's API page is not in the nav"


def test_backend_api_pages_document_every_public_backend_name(site: tuple[Path, str]) -> None:
    out, _ = site
    hooks = _hooks()
    for name in hooks.backend_modules():
        base = ROOT / "gradand" / "backends" / name
        init = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        page = out / "api" / "backends" / name / "index.html"
        assert page.is_file(), f"no API page for gradand.backends.{name}"
        html = page.read_text(encoding="utf-8")
        for public in _static_all(init):
            assert f'id="gradand.backends.{name}.{public}"' in html, (
                f"gradand.backends.{name}.{public} is public but not in its API page"
            )


def test_every_public_function_and_class_has_a_runnable_example() -> None:
    """Each public callable's docstring carries a doctest (pytest runs them with --doctest-modules)."""
    import inspect

    import gradand
    from gradand import consistency, temporal

    lacking = []
    for module, names in [
        (gradand, [n for n in gradand.__all__ if not n.startswith("__")]),
        (consistency, consistency.__all__),
        (temporal, temporal.__all__),
    ]:
        for name in names:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not callable(obj):
                continue  # modules have their own pages; constants are documented by a comment
            if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
                continue  # result records (NamedTuple): documented by their attributes
            if ">>>" not in (inspect.getdoc(obj) or ""):
                lacking.append(f"{module.__name__}.{name}")
    assert not lacking, f"public names without a runnable example in their docstring: {lacking}"
