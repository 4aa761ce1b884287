"""Where the public data sets are found: an explicit path, ``--data-dir``, the
``CONAN_DATA_DIR`` environment variable, or ``../shared/data`` beside the checkout.

For users who are online, :func:`load_hub_dataset` fetches the same public sets from the
Hugging Face hub by name.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "CONAN_DATA_DIR"
_PROJECT_ROOT = Path(__file__).resolve().parents[3]


class DataNotFoundError(FileNotFoundError):
    pass


def candidate_data_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders searched for data, in priority order."""
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir))
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    candidates.append(_PROJECT_ROOT.parent / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    return candidates


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The first existing data folder; an explicit ``data_dir`` that is missing is an error."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataNotFoundError(f"data folder {data_dir} does not exist")
    for candidate in candidate_data_dirs(data_dir):
        if candidate.is_dir():
            return candidate.resolve()
    searched = ", ".join(str(c) for c in candidate_data_dirs(data_dir))
    raise DataNotFoundError(
        f"no data folder found (searched {searched}); pass --data-dir or set {ENV_VAR}"
    )


def data_file(relative: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """A file inside the data folder, e.g. ``data_file("sts/stsb-en-test.csv")``."""
    path = resolve_data_dir(data_dir) / relative
    if not path.exists():
        raise DataNotFoundError(f"{path} not found in the data folder")
    return path


def local_data_available(data_dir: str | os.PathLike[str] | None = None) -> bool:
    try:
        resolve_data_dir(data_dir)
    except DataNotFoundError:
        return False
    return True


# The public hub copies of the local files, for users who are online.
HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "stsb-en": ("sentence-transformers/stsb", None),
    "stsb-multi-mt-zh": ("PhilipMay/stsb_multi_mt", "zh"),
    "cnsd-stsb": ("C-MTEB/STSB", None),
    "lcqmc": ("C-MTEB/LCQMC", None),
    "bq": ("C-MTEB/BQ", None),
    "atec": ("C-MTEB/ATEC", None),
    "banking77": ("mteb/banking77", None),
    "scifact-corpus": ("mteb/scifact", "corpus"),
    "tatoeba": ("mteb/tatoeba-bitext-mining", "cmn-eng"),
}


def load_hub_dataset(name: str, split: str | None = None):
    """Load one of :data:`HUB_DATASETS` from the Hugging Face hub (needs network access)."""
    from datasets import load_dataset

    if name not in HUB_DATASETS:
        raise KeyError(f"unknown hub data set {name!r}; known: {sorted(HUB_DATASETS)}")
    repo, config = HUB_DATASETS[name]
    return load_dataset(repo, config, split=split)
