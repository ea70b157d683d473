"""Framework adapters: ``gradand.backends.torch``, ``.jax``, ``.tensorflow``.

Each is imported explicitly by the user; importing :mod:`gradand` imports no
framework. A backend turns its framework's gradients into the core's arrays
and back, and adds what only that framework can do; it never re-implements a
combiner's math.
"""
