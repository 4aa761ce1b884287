"""conan-embedding: an open implementation of the Conan-embedding training system.

The pipeline reads top to bottom: ``data`` -> ``mining`` -> ``modeling`` -> ``losses`` ->
``training`` -> ``evaluation`` -> ``serving``. Later stages import earlier ones, never the
reverse.
"""

from __future__ import annotations

__version__ = "0.1.0"
