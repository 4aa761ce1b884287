"""conan-embedding: an open implementation of the Conan-embedding training system.

Layers, bottom to top: base (``_io``, ``runtime``, ``progress``, ``provenance``, ``config``) ->
``data`` -> ``modeling`` -> ``encoding`` -> builders (``data.prepare``, ``data.builders``) ->
``mining`` -> ``losses`` -> ``training`` -> ``evaluation`` -> ``reporting`` -> ``serving`` ->
``experiments`` (the shared runner, recipe v1, decoder v2, the demos, CBB and CLR) -> ``cli``.
A module imports only its own layer and those below it; ``tests/test_layers.py`` enforces it (docs/architecture.md).
"""

from __future__ import annotations

__version__ = "0.1.0"
