"""Bitext mining tasks: mteb's nearest-neighbour F1 between two aligned sides (``TatoebaBitextMining``)."""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from mteb.tasks.bitext_mining.multilingual.tatoeba_bitext_mining import TatoebaBitextMining

from conan_embedding.evaluation.tasks._base import (
    DataFormatError,
    LocalDataTask,
    non_empty,
    task_metadata,
)


class LocalTatoeba(LocalDataTask, TatoebaBitextMining):
    """MTEB Tatoeba ``cmn-eng``: sentence1 is Chinese, sentence2 English (LASER v1 files)."""

    metadata = task_metadata(TatoebaBitextMining, eval_langs={"cmn-eng": ["cmn-Hans", "eng-Latn"]})
    data_files = ("bitext/tatoeba.cmn-eng.cmn", "bitext/tatoeba.cmn-eng.eng")
    fast_loading = False

    def build_dataset(self) -> dict[str, Any]:
        sides = []
        for relative in self.data_files:
            path = self.path(relative)
            lines = path.read_text(encoding="utf-8").split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            for number, text in enumerate(lines, start=1):
                non_empty(path, number, "sentence", text)
            sides.append(lines)
        if len(sides[0]) != len(sides[1]):
            raise DataFormatError(
                f"{self.data_files[0]} has {len(sides[0])} lines but {self.data_files[1]} has {len(sides[1])}"
            )
        return {
            "cmn-eng": {"test": Dataset.from_dict({"sentence1": sides[0], "sentence2": sides[1]})}
        }
