"""Progress bars that stay readable when the output is a file or a pipe.

Why: tqdm redraws its bar in place with a carriage return several times a second. On a
terminal that is one line; in ``train.log``, a CI log or ``| tee`` it is thousands of
``\\r``-joined fragments on one line. Every progress bar of the package goes through
:func:`progress`, which gives tqdm's usual bar on a terminal and, anywhere else, a plain
newline-terminated line at the start, every ``every_percent`` of the total (or every
``every_seconds`` when the total is unknown), and one at the end::

    encode corpus.jsonl:   0%|          | 0/12000 [00:00<?, ?text/s]
    encode corpus.jsonl:  10%|#         | 1200/12000 [00:09<01:21, 132.1text/s]
    ...
    encode corpus.jsonl: 100%|##########| 12000/12000 [01:30<00:00, 133.0text/s]

How: :class:`LineProgress` is a :class:`tqdm.std.tqdm` whose ``display`` writes a line only
when the next threshold is crossed and whose clearing (``clear``, the ``\\r`` of ``close``)
is a no-op; counting, rates and ``set_postfix`` are tqdm's own. ``CONAN_PROGRESS`` overrides
the choice: ``bar`` (always tqdm's bar), ``lines`` (always lines) or ``off``.

The libraries underneath draw bars of their own (transformers' "Loading weights" and
"Writing model shards" on every load and checkpoint, huggingface_hub, datasets);
:func:`quiet_library_progress`, called by the ``conan-embed`` command line, turns those off
when the output is not a terminal.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import IO, Any, TypeVar

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

T = TypeVar("T")
ENV_VAR = "CONAN_PROGRESS"
MODES = ("auto", "bar", "lines", "off")


class LineProgress(std_tqdm):
    """tqdm that prints whole lines at thresholds instead of redrawing with ``\\r``."""

    def __init__(
        self,
        *args: Any,
        every_percent: float = 10.0,
        every_seconds: float = 60.0,
        **kwargs: Any,
    ):
        if every_percent <= 0 or every_seconds <= 0:
            raise ValueError("every_percent and every_seconds must be positive")
        self._every_percent = float(every_percent)
        self._every_seconds = float(every_seconds)
        self._next_percent = 0.0
        self._last_line_at: float | None = None
        self._last_line_n: float | None = None
        # tqdm's own refresh throttling is not needed: a line is written at thresholds only
        kwargs.setdefault("mininterval", 0.5)
        kwargs.setdefault("ascii", True)
        super().__init__(*args, **kwargs)

    def _due(self) -> bool:
        if self._last_line_n is None:
            return True
        if self.total:
            return 100.0 * self.n / self.total >= self._next_percent
        return time.monotonic() - (self._last_line_at or 0.0) >= self._every_seconds

    def _write_line(self) -> None:
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._last_line_at = time.monotonic()
        self._last_line_n = self.n
        if self.total:
            done = 100.0 * self.n / self.total
            step = self._every_percent
            self._next_percent = (int(done / step) + 1) * step

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm asks to clear or print a message in place: nothing to clear
            if msg:
                self.fp.write(msg + "\n")
            return False
        if self._due():
            self._write_line()
        return True

    def clear(self, nolock: bool = False) -> None:
        """Nothing is drawn in place, so nothing to clear."""

    def close(self) -> None:
        if getattr(self, "disable", True):
            return
        if self._last_line_n != self.n:
            with self._lock:
                self._ema_dt = lambda: None  # the overall rate in the last line, as tqdm does
                self._write_line()
        self.leave = False  # tqdm's close then only "clears", which is a no-op here
        super().close()


def progress_mode(file: IO[str] | None = None) -> str:
    """``bar``, ``lines`` or ``off``: ``CONAN_PROGRESS`` if set, else ``bar`` on a terminal."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    stream = file if file is not None else sys.stderr
    try:
        return "bar" if stream is not None and stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


def progress(
    iterable: Iterable[T] | None = None,
    *,
    desc: str | None = None,
    total: float | None = None,
    disable: bool = False,
    every_percent: float = 10.0,
    every_seconds: float = 60.0,
    file: IO[str] | None = None,
    **kwargs: Any,
) -> std_tqdm:
    """A tqdm progress bar, or :class:`LineProgress` when ``file`` (default stderr) is no TTY.

    Use it as tqdm: iterate over it, or call ``update``/``set_postfix``/``close`` (also as a
    context manager). Extra keyword arguments go to tqdm (``unit``, ``initial``, ...).
    """
    mode = progress_mode(file)
    if file is not None:
        kwargs["file"] = file
    disable = disable or mode == "off"
    if mode == "bar" or disable:
        return auto_tqdm(iterable, desc=desc, total=total, disable=disable, **kwargs)
    return LineProgress(
        iterable,
        desc=desc,
        total=total,
        every_percent=every_percent,
        every_seconds=every_seconds,
        **kwargs,
    )


_LIBRARY_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def quiet_library_progress(file: IO[str] | None = None) -> bool:
    """Turn off transformers', huggingface_hub's and datasets' own bars unless progress goes
    to a terminal (:func:`progress_mode` is ``bar``); returns True when it did.

    Sets their environment switches (respecting a value the user set) and, for libraries
    already imported, calls their ``disable_progress_bar(s)``.
    """
    if progress_mode(file) == "bar":
        return False
    for name in _LIBRARY_SWITCHES:
        os.environ.setdefault(name, "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils.logging import disable_progress_bar

            disable_progress_bar()
    if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and "datasets" in sys.modules:
        from datasets.utils.logging import disable_progress_bar as disable_datasets_bar

        disable_datasets_bar()
    return True
