"""Progress output to a file or a pipe is whole lines, never carriage-return redraws."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conan_embedding.progress import LineProgress, progress, progress_mode

SRC = str(Path(__file__).resolve().parents[1] / "src")

SCRIPT = textwrap.dedent(
    """
    import time
    import numpy as np
    from conan_embedding.progress import progress
    from conan_embedding.mining.index import build_index, search

    for _ in progress(range(200), desc="loop"):
        time.sleep(0.002)
    with progress(total=1000, desc="manual", unit="text") as bar:
        for _ in range(100):
            bar.update(10)
            bar.set_postfix(loss=0.5)
    # a real caller: FAISS search in 50 chunks
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((64, 8)).astype(np.float32)
    search(build_index(vectors, "exact"), vectors, 3, query_chunk=2, show_progress=True)
    """
)


def _run(mode: str | None) -> str:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CONAN_PROGRESS", None)
    if mode is not None:
        env["CONAN_PROGRESS"] = mode
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        check=True,
        timeout=120,
    )
    return done.stderr.decode("utf-8")


def test_piped_progress_has_no_carriage_returns_and_few_lines():
    err = _run(None)
    assert "\r" not in err
    for desc, total in (("loop", 200), ("manual", 1000), ("searching", 32)):
        lines = [line for line in err.splitlines() if line.startswith(f"{desc}:")]
        # a start line, at most one per 10 %, and the end: never one per update
        assert 2 <= len(lines) <= 12, (desc, lines)
        assert f"100%|##########| {total}/{total}" in lines[-1], lines[-1]
    manual = [line for line in err.splitlines() if line.startswith("manual:")]
    assert "loss=0.5" in manual[-1]


def test_forced_bar_does_redraw_so_the_check_above_means_something():
    assert "\r" in _run("bar")


def test_off_prints_nothing():
    assert _run("off") == ""


def test_mode_follows_the_stream_and_the_environment(monkeypatch):
    monkeypatch.delenv("CONAN_PROGRESS", raising=False)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_mode(io.StringIO()) == "lines"
    assert progress_mode(Tty()) == "bar"
    monkeypatch.setenv("CONAN_PROGRESS", "lines")
    assert progress_mode(Tty()) == "lines"
    monkeypatch.setenv("CONAN_PROGRESS", "loud")
    with pytest.raises(ValueError, match="CONAN_PROGRESS='loud'"):
        progress_mode(io.StringIO())


def test_lines_at_thresholds_in_process(monkeypatch):
    monkeypatch.delenv("CONAN_PROGRESS", raising=False)
    out = io.StringIO()
    bar = progress(total=100, desc="x", file=out, every_percent=25, mininterval=0)
    assert isinstance(bar, LineProgress)
    for _ in range(100):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    percents = [line.split("|")[0].split()[-1] for line in lines]
    assert percents == ["0%", "25%", "50%", "75%", "100%"]
    assert "\r" not in out.getvalue()


def test_unknown_total_and_initial(monkeypatch):
    monkeypatch.delenv("CONAN_PROGRESS", raising=False)
    out = io.StringIO()
    with progress(iter(range(5)), desc="n", file=out) as bar:
        for _ in bar:
            pass
    assert out.getvalue().splitlines()[-1].startswith("n: 5it")
    out = io.StringIO()
    bar = progress(total=10, initial=4, desc="resumed", file=out, mininterval=0)
    bar.update(6)
    bar.close()
    assert out.getvalue().splitlines()[0].startswith("resumed:  40%")
    assert out.getvalue().splitlines()[-1].startswith("resumed: 100%")


LIBRARY_SCRIPT = textwrap.dedent(
    """
    import sys
    from conan_embedding.progress import quiet_library_progress
    quiet_library_progress()
    from transformers import BertModel
    model = BertModel.from_pretrained(sys.argv[1])
    model.save_pretrained(sys.argv[2])
    """
)


@pytest.mark.parametrize("mode", [None, "bar"])
def test_library_bars_are_off_when_piped(tmp_path, tiny_bert, mode):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in ("CONAN_PROGRESS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)
    if mode is not None:
        env["CONAN_PROGRESS"] = mode
    done = subprocess.run(
        [sys.executable, "-c", LIBRARY_SCRIPT, str(tiny_bert), str(tmp_path / "saved")],
        env=env,
        capture_output=True,
        check=True,
        timeout=120,
    )
    # transformers draws "Loading weights" / "Writing model shards" unless told not to
    assert (b"\r" in done.stderr) == (mode == "bar"), done.stderr[-500:]
