"""The old name of :mod:`conan_embedding.training.cbb`, kept as a documented alias.

``python -m conan_embedding.training.distributed CONFIG [OPTIONS]`` is the old spelling of
``conan-embed train-cbb CONFIG [OPTIONS]`` (the same command, options, output and errors),
kept for older torchrun command lines; new ones say ``torchrun ... -m conan_embedding.cli
train CONFIG``. Importing the CBB names from here still works until callers move to
``training.cbb``; new code imports them from there.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from conan_embedding.training.cbb import CBBTrainer, RankLayout, check_cbb_supported, run_cbb

__all__ = ["CBBTrainer", "RankLayout", "check_cbb_supported", "main", "run_cbb"]


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``conan-embed train-cbb`` with ``argv`` (default: the command line). Exits like
    the CLI does."""
    # the CLI owns the one training entry point (it dispatches on the config's `cbb:` section)
    from conan_embedding.cli import app

    app(["train-cbb", *(sys.argv[1:] if argv is None else argv)], prog_name="conan-embed")


if __name__ == "__main__":
    main()
