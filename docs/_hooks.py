"""MkDocs hook: an API reference page for every framework backend that exists.

The backends (``gradand/backends/torch.py``, ``jax``, ``tensorflow``, as
modules or packages) land independently. For each one present in the source
tree, this hook adds ``api/backends/<name>.md`` rendering ``gradand.backends.<name>``
with mkdocstrings, and lists it under "API reference" in the navigation, so the
reference always covers every public module without anyone editing the nav. A page
lists the backend's entry points first, then its building blocks, then helpers
(``SECTIONS``); exported modules that are not user API (``INTERNALS``, e.g. the
TensorFlow backend's ``xp`` namespace) get a note, not an API entry.
Discovery reads file names and ``__all__`` only; no framework is imported.
"""

from __future__ import annotations

import ast
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


#: Each backend page, most used first: (section title, one-line intro, names). Names
#: a backend does not export are skipped; exported names listed nowhere go to a last
#: section, so the page always covers every public name.
SECTIONS: dict[str, list[tuple[str, str, list[str]]]] = {
    "torch": [
        (
            "Entry points",
            "One call where `loss.backward()` was, or an optimizer.",
            ["backward", "model_backward", "vmap_backward", "factored_backward", "TemporalAndMaskAdam"],
        ),
        (
            "Building blocks",
            "The statistics an entry point computes, merged across workers, then written to `.grad`.",
            [
                "streaming_statistics",
                "vectorized_statistics",
                "factored_statistics",
                "all_reduce_statistics",
                "finalize_gradients",
            ],
        ),
        (
            "Distributed training",
            "A DDP communication hook that sums statistics over ranks instead of averaging gradients.",
            ["register_comm_hook", "comm_hook", "CommHookState"],
        ),
        (
            "Consistency of minima",
            "Inputs for `gradand.consistency`.",
            ["environment_losses", "environment_hessians"],
        ),
        ("Helpers and constants", "", ["environment_groups", "environment_batches", "FACTORED_LAYERS"]),
    ],
    "jax": [
        (
            "Entry points",
            "Gradient transforms and optax transformations.",
            ["value_and_grad", "factored_value_and_grad", "reduce_environments", "temporal_and_mask"],
        ),
        (
            "Building blocks",
            "The core's verbs over pytrees, and the pieces the entry points are made of.",
            [
                "streaming_statistics",
                "vectorized_statistics",
                "factored_statistics",
                "statistics",
                "all_reduce_statistics",
                "finalize_gradients",
                "finalize",
                "combine",
                "scale_by_temporal_and_mask",
                "dense",
                "conv",
            ],
        ),
        (
            "Results and optimizer states",
            "",
            ["GradInfo", "TreeInfo", "ReduceEnvironmentsState", "TemporalAndMaskState"],
        ),
        (
            "Consistency of minima",
            "Inputs for `gradand.consistency`.",
            ["environment_losses", "environment_hessians"],
        ),
        ("Constants", "", ["FACTORED_LAYERS", "NAN_POLICIES"]),
    ],
    "tensorflow": [
        (
            "Entry points",
            "Combined gradients from a tape, Keras `fit()`, and an optimizer.",
            [
                "gradient",
                "model_gradient",
                "combined_gradients",
                "factored_gradients",
                "EnvironmentModel",
                "TemporalAndMask",
            ],
        ),
        (
            "Building blocks",
            "The statistics an entry point computes, merged across replicas, then finalized.",
            [
                "streaming_statistics",
                "environment_statistics",
                "vectorized_statistics",
                "factored_statistics",
                "all_reduce_statistics",
                "finalize_gradients",
                "CombinedGradients",
                "EnvironmentTrainStep",
            ],
        ),
        (
            "Data and consistency of minima",
            "",
            ["environment_batches", "environment_losses", "environment_hessians"],
        ),
        ("Constants", "", ["FACTORED_LAYERS"]),
    ],
}

#: Public by ``__all__`` but not user API: shown as a note, not documented as API.
INTERNALS: dict[str, dict[str, str]] = {
    "tensorflow": {
        "xp": (
            "the array namespace of `tf` operations that the core runs on. Importing "
            "`gradand.backends.tensorflow` registers it with the core, so `gradand.combine`, "
            "`gradand.statistics`, `gradand.finalize` and `gradand.temporal` take `tf.Tensor` and "
            "`tf.Variable` arguments without it being named."
        ),
    },
}


def public_names(name: str) -> list[str]:
    """A backend's ``__all__``, read without importing it (backends import frameworks)."""
    package = BACKENDS / name
    path = package / "__init__.py" if package.is_dir() else package.with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return list(ast.literal_eval(node.value))
    return []


def page_source(name: str) -> str:
    title = TITLES.get(name, name)
    module = f"gradand.backends.{name}"
    parts = [
        f"# {title} backend\n\n"
        f"`{module}` adapts the core to {title}: it turns {title}'s gradients into "
        f"the core's arrays and back, and never re-implements a combiner's math. "
        f"Import it explicitly; importing `gradand` imports no framework.\n\n"
        f"::: {module}\n"
        f"    options:\n"
        f"      members: false\n"
    ]
    exported = public_names(name)
    internal = INTERNALS.get(name, {})
    sections = [(s, intro, [n for n in names if n in exported]) for s, intro, names in SECTIONS.get(name, [])]
    listed = {n for _, _, names in sections for n in names}
    rest = [n for n in exported if n not in listed and n not in internal]
    sections.append(("Other names", "", rest))
    for section, intro, names in sections:
        if not names:
            continue
        parts.append(f"\n## {section}\n\n" + (f"{intro}\n\n" if intro else ""))
        for member in names:
            parts.append(
                f"::: {module}.{member}\n"
                f"    options:\n"
                f"      heading_level: 3\n"
                f"      show_if_no_docstring: true\n\n"
            )
    notes = [(n, text) for n, text in internal.items() if n in exported]
    if notes:
        parts.append("\n## Internals\n\nExported, but not meant to be called from your code:\n\n")
        for member, text in notes:
            parts.append(f'- <span id="{module}.{member}"></span>`{module}.{member}`: {text}\n')
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
