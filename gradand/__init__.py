"""gradand: learning explanations that are hard to vary (Parascandolo et al., ICLR 2021).

Combine per-environment gradients with a logical AND instead of an average:
keep the gradient components on which the environments agree in sign.

The core is array-API generic (numpy, torch, jax, cupy, array-api-strict) and
never imports a framework; :mod:`gradand.backends` adapts it to PyTorch, JAX
and TensorFlow training loops.

Example:
    >>> import numpy as np
    >>> import gradand
    >>> grads = np.array([[1.0, -2.0], [3.0, 2.0]])  # 2 environments, 2 components
    >>> gradand.combine(grads, gradand.AndMask(threshold=1.0, rescale=False))
    array([2., 0.])
"""

from gradand import consistency, temporal
from gradand._combine import MaskInfo, agreement, combine, finalize, finalize_many
from gradand._combiners import AndMask, Combiner, GeometricMean, Mean, SandMask
from gradand._factored import LayerFactors, layer_statistics
from gradand._namespace import array_namespace, register_namespace
from gradand._outer import OUTER_STATISTICS, outer_statistics
from gradand._result import Result, summarize
from gradand._stats import (
    MAX_COUNT,
    STATISTIC_NAMES,
    Statistics,
    all_reduce_statistics,
    merge,
    required_votes,
    statistics,
)

__version__ = "0.1.0"

__all__ = [
    "MAX_COUNT",
    "OUTER_STATISTICS",
    "STATISTIC_NAMES",
    "AndMask",
    "Combiner",
    "GeometricMean",
    "LayerFactors",
    "MaskInfo",
    "Mean",
    "Result",
    "SandMask",
    "Statistics",
    "__version__",
    "agreement",
    "all_reduce_statistics",
    "array_namespace",
    "combine",
    "consistency",
    "finalize",
    "finalize_many",
    "layer_statistics",
    "merge",
    "outer_statistics",
    "register_namespace",
    "required_votes",
    "statistics",
    "summarize",
    "temporal",
]
