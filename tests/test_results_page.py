"""docs/results.md is what ``conan-embed recipe report`` makes of the committed JSONs (issue #25).

The results page may only say what ``bench/results/recipe/*.json`` say: regenerating it from
those files (the hand-written analysis section carried over, as the report does) must give
the committed page byte for byte. The chart is left out (it is an image of the same numbers).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conan_embedding.experiments.recipe_v1.report import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = "bench/results/recipe"  # relative, as the page names it (its default)
PAGE = ROOT / "docs" / "results.md"


def test_the_committed_results_page_is_regenerated_from_the_committed_jsons(tmp_path, monkeypatch):
    page = tmp_path / "results.md"
    shutil.copyfile(PAGE, page)  # the analysis section is kept from the page being replaced
    monkeypatch.chdir(ROOT)
    write_results(RESULTS_DIR, page, chart=False)
    assert page.read_text(encoding="utf-8") == PAGE.read_text(encoding="utf-8"), (
        "docs/results.md differs from what `conan-embed recipe report` makes of "
        "bench/results/recipe/*.json: regenerate it, and commit the JSONs it quotes"
    )
    assert not (tmp_path / "results.png").exists()  # chart=False draws nothing


def test_the_result_jsons_are_not_ignored_by_git():
    """A JSON the page is made from must be committable (not hidden by .gitignore)."""
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return
    sample = "bench/results/recipe/full-s42.json"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", sample], cwd=ROOT, capture_output=True, check=False
    )
    assert ignored.returncode == 1, f"{sample} is ignored by .gitignore"
