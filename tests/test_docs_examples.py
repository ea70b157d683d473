"""Every code block of the documentation runs, page by page, as the reader would run it.

For each page under ``docs/`` (and the README):

- ```` ```python ```` blocks run in order in one fresh namespace per page;
- ```` ```pycon ```` blocks (``>>>`` sessions) run as doctests in that same
  namespace, so the outputs shown are the outputs produced;
- ```` ```bash ```` blocks: every ``gradand ...`` command must be accepted by
  the command line's parser (nothing is installed or trained);
- a ```` ```text ```` block preceded by ``<!-- output-of: gradand ARGS -->`` must
  match what that command prints (as a doctest output: ``...`` for text that
  varies, such as timings; whitespace normalised). A slow command's output is
  shown as ``<!-- recorded: gradand ARGS (where and when) -->``: the command
  must still be valid.

A page whose blocks import a framework that is not installed is skipped with
the reason. A block preceded by ``<!-- skip: reason -->`` is not run (rare:
for show only). A page containing ``<!-- docs-test: subprocess -->`` runs its
python blocks as one script in a fresh interpreter (for code that spawns
processes or must set environment variables before a framework is imported).
"""

from __future__ import annotations

import contextlib
import doctest
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

#: Languages whose blocks are executed or checked, and those that are only shown.
EXECUTED = {"python", "pycon", "bash", "text"}
SHOWN = {"mermaid", "yaml", "toml", "bibtex"}

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=ticks)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_DIRECTIVE = re.compile(r"<!--\s*(?P<key>skip|output-of|recorded)\s*:\s*(?P<value>.*?)\s*-->\s*\Z", re.DOTALL)
_SUBPROCESS = "<!-- docs-test: subprocess -->"

#: import name -> module that must be installed for a page that imports it.
_FRAMEWORKS = {
    "torch": "torch",
    "jax": "jax",
    "optax": "optax",
    "flax": "flax",
    "tensorflow": "tensorflow",
    "keras": "keras",
    "gradand.backends.torch": "torch",
    "gradand.backends.jax": "jax",
    "gradand.backends.tensorflow": "tensorflow",
    "matplotlib": "matplotlib",
    "sklearn": "sklearn",
}
_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str
    line: int
    language: str
    code: str
    skip: str | None = None
    output_of: str | None = None
    recorded: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with their directives."""
    text = path.read_text(encoding="utf-8")
    page = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    out = []
    for m in _FENCE.finditer(text):
        language = (m.group("info").strip().split() or [""])[0].lstrip(".").lower()
        body = textwrap.dedent(m.group("body"))
        before = text[: m.start()].rstrip()
        # the comment just above the block, however long (from its own "<!--")
        directive = _DIRECTIVE.search(before[before.rfind("<!--") :]) if before.endswith("-->") else None
        skip = output_of = recorded = None
        if directive:
            key, value = directive.group("key"), directive.group("value")
            if key == "skip":
                skip = value or "no reason given"
            elif key == "output-of":
                output_of = value
            else:
                recorded = value
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(page, line, language, body, skip, output_of, recorded))
    return out


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def missing_frameworks(blocks: list[Block]) -> list[str]:
    """Frameworks that the page's python imports need and that are not installed."""
    needed = set()
    for b in blocks:
        if b.language not in ("python", "pycon") or b.skip:
            continue
        for m in _IMPORT.finditer(b.code.replace(">>> ", "").replace("... ", "")):
            name = m.group(1) or m.group(2)
            for prefix, module in _FRAMEWORKS.items():
                if name == prefix or name.startswith(prefix + "."):
                    needed.add(module)
    return sorted(m for m in needed if importlib.util.find_spec(m) is None)


def _limit_threads() -> None:
    """Keep framework thread pools small: the test machine is shared."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def run_python(block: Block, namespace: dict) -> None:
    code = compile(block.code, f"<{block.where}>", "exec")
    exec(code, namespace)
    _limit_threads()


def run_pycon(block: Block, namespace: dict) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.code, namespace, block.where, block.page, block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    runner.run(test, out=report.write, clear_globs=False)
    namespace.update(test.globs)  # DocTest copies its globals; later blocks see these names
    _limit_threads()
    assert runner.failures == 0, f"doctest block at {block.where} failed:\n{report.getvalue()}"


def gradand_commands(code: str) -> list[list[str]]:
    """The ``gradand ...`` invocations in a shell block, as argument lists."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|\|\||;", line):
            words = shlex.split(part, comments=True)
            if words and Path(words[0]).name == "gradand":
                commands.append(words[1:])
    return commands


def check_bash(block: Block) -> None:
    from gradand.cli import build_parser

    for argv in gradand_commands(block.code):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(argv)
        except SystemExit as exc:
            if argv and argv[-1] in ("-h", "--help") and exc.code == 0:
                continue
            raise AssertionError(
                f"{block.where}: `gradand {shlex.join(argv)}` is not a valid command line:\n{err.getvalue()}"
            ) from None
        except Exception as exc:  # a parser built with exit_on_error=False raises instead of exiting
            raise AssertionError(
                f"{block.where}: `gradand {shlex.join(argv)}` is not a valid command line: {exc}"
            ) from None


def check_recorded(block: Block) -> None:
    """A recorded output names the command that produced it; the command must still parse."""
    command = block.recorded.split("(")[0].strip()
    assert command.startswith("gradand "), f"{block.where}: recorded must name a gradand command"
    assert block.code.strip(), f"{block.where}: a recorded output is empty"
    check_bash(Block(block.page, block.line, "bash", command))


def command_output(argv: list[str]) -> str:
    from gradand.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = main(argv)
    assert rc in (0, None), f"`gradand {shlex.join(argv)}` exited with {rc}"
    return out.getvalue()


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def check_output(block: Block) -> None:
    """The page shows the command's output; ``...`` stands for varying text (timings, paths)."""
    argv = shlex.split(block.output_of)
    assert argv and argv[0] == "gradand", f"{block.where}: output-of must name a gradand command"
    actual = command_output(argv[1:])
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    assert checker.check_output(_normalise(block.code) + "\n", _normalise(actual) + "\n", flags), (
        f"{block.where}: the page shows an output of `{block.output_of}` that differs from what it "
        f"prints now:\n--- page\n{block.code}\n--- actual\n{actual}"
    )


def run_page_in_process(blocks: list[Block], page: str) -> int:
    """Run every block of a page in one fresh namespace; returns how many ran.

    A block that imports a framework that is not installed is skipped; if a later
    block then fails for a missing name, the rest of the page is skipped too.
    """
    # a real module, so that dataclasses, pickling and `inspect` work as in a script
    module = types.ModuleType("docs_page_" + re.sub(r"\W", "_", page), f"the code of {page}")
    module.__file__ = str(ROOT / page)
    namespace = module.__dict__
    sys.modules[module.__name__] = module
    try:
        return _run_blocks(blocks, namespace)
    finally:
        del sys.modules[module.__name__]


def _run_blocks(blocks: list[Block], namespace: dict) -> int:
    ran = 0
    skipped: list[str] = []
    for block in blocks:
        if block.skip or block.language in SHOWN:
            continue
        if block.language in ("python", "pycon"):
            missing = missing_frameworks([block])
            if missing:
                skipped.append(f"{block.where} needs {', '.join(missing)}")
                continue
        try:
            if block.language == "python":
                try:
                    run_python(block, namespace)
                except Exception as exc:
                    raise AssertionError(f"python block at {block.where} raised {exc!r}") from exc
            elif block.language == "pycon":
                run_pycon(block, namespace)
            elif block.language == "bash":
                check_bash(block)
            elif block.language == "text" and block.output_of:
                check_output(block)
            elif block.language == "text" and block.recorded:
                check_recorded(block)
            else:
                continue
        except AssertionError as exc:
            if skipped and ("NameError" in str(exc) or "ModuleNotFoundError" in str(exc)):
                skipped.append(f"{block.where} and later blocks depend on them")
                break
            raise
        ran += 1
    if skipped:
        pytest.skip(f"ran {ran} blocks; skipped: {'; '.join(skipped)} (not installed)")
    return ran


def run_page_in_subprocess(blocks: list[Block], page: str, tmp_path: Path) -> int:
    """Run a page's python blocks as one script in a fresh interpreter."""
    python = [b for b in blocks if b.language == "python" and not b.skip]
    assert not [b for b in blocks if b.language == "pycon" and not b.skip], (
        f"{page}: subprocess pages take python blocks only"
    )
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(b.code for b in python), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{page} failed as a script:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for block in blocks:
        if block.language == "bash" and not block.skip:
            check_bash(block)
    return len(python)


def run_page(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    blocks = blocks_of(path)
    monkeypatch.chdir(tmp_path)
    page = str(path.relative_to(ROOT))
    if _SUBPROCESS in path.read_text(encoding="utf-8"):
        missing = missing_frameworks(blocks)
        if missing:
            pytest.skip(f"{path.name} needs {', '.join(missing)}, which is not installed")
        return run_page_in_subprocess(blocks, page, tmp_path)
    return run_page_in_process(blocks, page)


@pytest.mark.slow
@pytest.mark.parametrize("path", doc_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_code_block_of_the_page_runs(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_page(path, tmp_path, monkeypatch)


def test_every_docs_code_block_is_executed_checked_or_explicitly_skipped() -> None:
    unknown = [
        f"{b.where} (```{b.language or '<no language>'})"
        for p in doc_pages()
        for b in blocks_of(p)
        if b.language not in EXECUTED | SHOWN
    ]
    assert not unknown, f"code blocks in a language the docs test neither runs nor checks: {unknown}"
    unchecked_text = [
        b.where
        for p in doc_pages()
        for b in blocks_of(p)
        if b.language == "text" and not (b.output_of or b.recorded)
    ]
    assert not unchecked_text, (
        f"text blocks must show a command's output (<!-- output-of: gradand ... --> or "
        f"<!-- recorded: gradand ... (where, when) -->): {unchecked_text}"
    )


def test_skip_markers_are_rare_and_give_a_reason() -> None:
    skipped = [b for p in doc_pages() for b in blocks_of(p) if b.skip]
    total = sum(1 for p in doc_pages() for b in blocks_of(p) if b.language in ("python", "pycon"))
    assert total >= 20, f"expected the docs to hold at least 20 python examples; found {total}"
    assert len(skipped) <= max(2, total // 10), f"too many skipped blocks: {[b.where for b in skipped]}"
    assert all(b.skip and b.skip != "no reason given" for b in skipped)


@pytest.mark.parametrize(
    "page",
    [
        "```python\nraise RuntimeError('broken example')\n```\n",
        "```pycon\n>>> 1 + 1\n3\n\n```\n",
        "<!-- output-of: gradand reproduce patchwork -->\n```text\nnot what it prints\n```\n",
        "```bash\ngradand reproduce no-such-experiment\n```\n",
        "<!-- recorded: gradand reproduce no-such-experiment (here) -->\n```text\nold output\n```\n",
    ],
    ids=["raising python", "wrong pycon output", "stale command output", "unknown command", "bad recording"],
)
def test_a_broken_example_fails_its_page(page: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.md"
    path.write_text("# A page\n\n" + page, encoding="utf-8")
    with pytest.raises(AssertionError):
        run_page_in_process(blocks_of(path), "broken.md")


def test_skip_marker_and_page_namespace_are_honoured(tmp_path: Path) -> None:
    path = tmp_path / "ok.md"
    path.write_text(
        "```python\nvalue = 41\n```\n\n<!-- skip: for show only -->\n```python\nraise SystemExit\n```\n\n"
        "```pycon\n>>> value + 1\n42\n\n```\n",
        encoding="utf-8",
    )
    blocks = blocks_of(path)
    assert [b.skip for b in blocks] == [None, "for show only", None]
    assert run_page_in_process(blocks, "ok.md") == 2


def test_a_block_needing_a_missing_framework_is_skipped_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a)
    )
    path = tmp_path / "needs_torch.md"
    path.write_text(
        "```python\nx = 1\n```\n\n```python\nimport torch\n\nt = torch.ones(2)\n```\n\n"
        "```python\nprint(t)\n```\n",
        encoding="utf-8",
    )
    with pytest.raises(pytest.skip.Exception, match="needs torch"):
        run_page_in_process(blocks_of(path), "needs_torch.md")


def test_readme_python_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [b for b in blocks_of(README) if b.language == "python"]
    assert blocks, "the README has no python block"
    assert run_page(README, tmp_path, monkeypatch) >= len(blocks)


def test_readme_patchwork_table_matches_the_experiment() -> None:
    """The README's table of weights and held-out losses is what `train` produces."""
    from gradand.experiments.patchwork import default_combiners, train

    text = README.read_text(encoding="utf-8")
    rows = re.findall(r"^(\w+)\s+(\d) envs\s+\[([^\]]*)\]\s+(\S+)\s*$", text, re.MULTILINE)
    assert len(rows) >= 6, "expected the README's patchwork table (6 rows)"
    combiners = default_combiners()
    for method, n_envs, weights, held_out in rows:
        result = train(combiners[method], environments=tuple(range(int(n_envs))))
        shown = [float(w) for w in weights.split(",")]
        assert result.weights.round(2).tolist() == pytest.approx(shown, abs=0.005 + 1e-9), (method, n_envs)
        if held_out != "-":
            assert round(result.heldout_loss, 3) == pytest.approx(float(held_out), abs=1e-9), (method, n_envs)


def test_figure_script_draws_the_committed_figures(tmp_path: Path) -> None:
    """docs/figures/make_figures.py runs and draws every figure committed next to it.

    (Missing images fail the strict site build; figures under docs/figures/results
    are copies of the plots that `gradand reproduce ...` writes.)
    """
    pytest.importorskip("matplotlib")
    script = DOCS / "figures" / "make_figures.py"
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn = {p.name for p in tmp_path.glob("*.png")}
    committed = {p.name for p in (DOCS / "figures").glob("*.png")}
    assert drawn == committed, f"drawn {sorted(drawn)} but committed {sorted(committed)}"
    for name in drawn:
        assert (tmp_path / name).stat().st_size > 10_000, f"{name} looks empty"
