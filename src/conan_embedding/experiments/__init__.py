"""Experiments: orchestration on top of the library (train -> evaluate -> result JSON).

Nothing in the library imports this package; each experiment writes its result through
:mod:`conan_embedding.experiments.runner`.
"""

from __future__ import annotations
