"""Root conftest: skip doctests of modules whose framework is not installed."""

import importlib.util

_FRAMEWORK_OF = {
    "gradand/backends/torch": "torch",
    "gradand/backends/jax": "jax",
    "gradand/backends/tensorflow": "tensorflow",
}

collect_ignore_glob = [
    f"{path}*" for path, module in _FRAMEWORK_OF.items() if importlib.util.find_spec(module) is None
]
