"""Where a result came from: the checkout's commit, the machine, the package versions, the load.

Every result file the project writes (recipe arms, the v2 conversion ablation, evaluation runs,
benchmarks, model cards) records the same facts under the same keys, so two result files can
be compared without knowing which script wrote them. This module is the one place they are
read; it imports nothing of the package.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["cpu_name", "git_commit", "loadavg", "machine", "versions"]

_CHECKOUT = Path(__file__).resolve().parents[2]
VERSIONED = ("conan-embedding", "sentence-transformers", "transformers", "torch")
"""The distributions :func:`versions` reports by default."""


def git_commit(root: str | os.PathLike[str] | None = None) -> str | None:
    """HEAD of the checkout (``root``, default the one holding this package), with ``+dirty``
    when tracked files differ from it; None outside a git checkout or without git."""
    cwd = Path(root) if root is not None else _CHECKOUT
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def loadavg() -> list[float]:
    """The 1/5/15-minute load averages, rounded to 2 decimals (``[]`` where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo``, else ``platform.processor()``, else ``unknown``."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(detail: bool = False) -> dict[str, Any]:
    """``{"platform", "cpus"}``; with ``detail`` also the CPU model, memory (GB), Python,
    torch's thread count and ``OMP_NUM_THREADS`` (what a timing depends on)."""
    out: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    if not detail:
        return out
    out["cpu"] = cpu_name()
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        first = meminfo.read_text(encoding="utf-8").splitlines()[0]
        out["memory_gb"] = round(int(first.split()[1]) / 1024**2, 1)
    out["python"] = platform.python_version()
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    out["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    return out


def versions(packages: tuple[str, ...] = VERSIONED) -> dict[str, str]:
    """``{"python": ..., distribution: version}`` for the installed ones of ``packages``."""
    out = {"python": platform.python_version()}
    for package in packages:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out
