"""``python -m conan_embedding.cli`` (and ``torchrun ... -m conan_embedding.cli``)."""

from __future__ import annotations

from conan_embedding.cli import app

if __name__ == "__main__":
    app()
