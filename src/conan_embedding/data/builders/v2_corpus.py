"""The Conan-v2 CPU path's training files, built from the zh/en text in ``shared/data``:
the pretraining sources and SFT rows (:func:`build_shared_corpus`, stages 1-3) and stage 4's
STS / retrieval / cross-lingual files (:func:`build_supervised_records`).

Why here: like every builder, they write training files and keep every sentence of an
evaluation set out of them through the one index, :mod:`conan_embedding.data.leakage`.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
from pathlib import Path
from typing import Any

from conan_embedding._io import write_json_atomic
from conan_embedding.data.leakage import build_eval_index, dedup_retrieval
from conan_embedding.data.records import (
    RecordError,
    RetrievalRecord,
    iter_json_objects,
    write_records,
)
from conan_embedding.data.sources import resolve_data_dir


def build_shared_corpus(
    output_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Pretraining sources and SFT rows from the zh/en text in ``shared/data``.

    Sources (one ``.txt`` each): ``parallel`` (cmn.txt pairs), ``hsk`` (graded Chinese with its
    English), ``web`` (CMRC 2018 *trial* passages; dev stays free for retrieval checks),
    ``qa`` (CMRC trial question + answer), ``sts`` (STS-B and CNSD *train* sentences). Any line
    holding a sentence of an evaluation set (test, dev or pool: the one index of
    :mod:`conan_embedding.data.leakage`) is dropped; the counts removed are returned.
    SFT rows: en->zh and zh->en translation, CMRC QA, and STS-B train paraphrases (score >= 4).
    """
    data = resolve_data_dir(data_dir)
    out = Path(output_dir)
    # every group: this corpus trains on none of the dev files or pools
    index = build_eval_index(data)
    removed: dict[str, int] = {}

    def clean(name: str, pairs: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        kept = [p for p in pairs if index.clean(*p)]
        removed[name] = len(pairs) - len(kept)
        return kept

    parallel = []
    for line in (data / "parallel/cmn.txt").read_text(encoding="utf-8-sig").splitlines():
        cells = line.split("\t")
        if len(cells) >= 2 and cells[0].strip() and cells[1].strip():
            parallel.append((cells[0].strip(), cells[1].strip()))
    parallel = clean("parallel", parallel)
    with gzip.open(data / "parallel/hsk-sentences.json.gz", "rt", encoding="utf-8") as handle:
        hsk_rows = json.load(handle)
    hsk = clean(
        "hsk",
        [
            (r["chinese"].strip(), r["translation"]["en"].strip())
            for r in hsk_rows
            if r.get("chinese") and (r.get("translation") or {}).get("en")
        ],
    )
    cmrc = json.loads((data / "retrieval/cmrc2018_trial.json").read_text(encoding="utf-8"))
    passages, qa = [], []
    for article in cmrc["data"]:
        for paragraph in article["paragraphs"]:
            passages.append((" ".join(paragraph["context"].split()),))
            for question in paragraph["qas"]:
                if question["answers"]:
                    qa.append(
                        (question["question"].strip(), question["answers"][0]["text"].strip())
                    )
    passages, qa = clean("web", passages), clean("qa", qa)
    sts_pairs: list[tuple[str, str, float]] = []
    for name in ("sts/stsb-en-train.csv", "sts/stsb-zh-train.csv"):
        with open(data / name, encoding="utf-8", newline="") as handle:
            sts_pairs.extend((r[0], r[1], float(r[2])) for r in csv.reader(handle) if len(r) >= 3)
    for line in (data / "sts/cnsd-stsb.train.data").read_text(encoding="utf-8").splitlines():
        cells = line.split("\t")
        if len(cells) >= 3:
            sts_pairs.append((cells[0], cells[1], float(cells[2])))
    kept_sts = [p for p in sts_pairs if index.clean(p[0], p[1])]
    removed["sts"] = len(sts_pairs) - len(kept_sts)
    sts_sentences = sorted({s for p in kept_sts for s in p[:2]})

    texts = {
        "parallel": [f"{en}\n{zh}" for en, zh in parallel],
        "hsk": [f"{zh}\n{en}" for zh, en in hsk],
        "web": [p[0] for p in passages],
        "qa": [f"问：{q}\n答：{a}" for q, a in qa],
        "sts": sts_sentences,
    }
    paths: dict[str, str] = {}
    for name, docs in texts.items():
        # a .txt source is one document per line, so embedded newlines are escaped as JSONL
        path = out / f"{name}.jsonl"
        write_records(path, ({"text": doc} for doc in docs))
        paths[name] = str(path)
    rng = random.Random(0)
    sft = (
        [
            {"instruction": "Translate into Chinese.", "input": en, "output": zh}
            for en, zh in parallel
        ]
        + [{"instruction": "翻译成英文。", "input": zh, "output": en} for zh, en in hsk]
        + [{"instruction": "回答问题。", "input": q, "output": a} for q, a in qa]
        + [
            {"instruction": "Paraphrase.", "input": a, "output": b}
            for a, b, score in kept_sts
            if score >= 4
        ]
    )
    rng.shuffle(sft)
    sft_path = out / "sft.jsonl"
    write_records(sft_path, sft)
    summary = {
        "sources": paths,
        "documents": {k: len(v) for k, v in texts.items()},
        "sft": str(sft_path),
        "sft_rows": len(sft),
        "removed_for_leakage": removed,
        "eval_files_missing": index.missing,  # a missing file is not guarded against
    }
    write_json_atomic(out / "corpus.json", summary)
    return summary


def build_supervised_records(
    output_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    negatives: int = 3,
    seed: int = 0,
) -> dict[str, str]:
    """Stage-4 training files in the foundation's JSONL schemas, from ``shared/data`` train sets.

    ``sts.jsonl`` (STS-B en/zh + CNSD *train*, CoSENT), ``retrieval.jsonl`` (text2vec's BGE
    triples, built from CNSD train), ``clr.jsonl`` (cross-lingual retrieval: an English
    sentence retrieves its Chinese translation from cmn.txt, ``negatives`` random other
    translations). Rows holding any sentence of the evaluation index
    (:mod:`conan_embedding.data.leakage`, every group) are dropped. That index holds the queries
    and positives of the 300 ``bge_finetune_data.jsonl`` rows ``BGEHeldoutRerankingLocal``
    scores, so neither those retrieval rows nor the CNSD train pairs they were built from are
    trained on (before 2026-12-06 they were: issue 25).
    """
    data = resolve_data_dir(data_dir)
    out = Path(output_dir)
    index = build_eval_index(data)
    clean = index.clean

    sts = []
    for name in ("sts/stsb-en-train.csv", "sts/stsb-zh-train.csv"):
        with open(data / name, encoding="utf-8", newline="") as handle:
            sts += [(r[0], r[1], float(r[2])) for r in csv.reader(handle) if len(r) >= 3]
    for line in (data / "sts/cnsd-stsb.train.data").read_text(encoding="utf-8").splitlines():
        cells = line.split("\t")
        if len(cells) >= 3:
            sts.append((cells[0], cells[1], float(cells[2])))
    sts_rows = [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in sts if clean(a, b)]

    # as every builder: a row whose query or positives touch the index goes, touching
    # negatives are removed one by one (dropping the whole row for a touching negative, as
    # before, would lose half the file: the held-out sentences are random negatives elsewhere)
    bge = data / "retrieval/bge_finetune_data.jsonl"
    triples = []
    for line_no, row in iter_json_objects(bge):  # bad rows raise file:line: field
        for name in ("query", "pos", "neg"):
            if not isinstance(row.get(name), str if name == "query" else list):
                raise RecordError(bge, line_no, name, "missing or of the wrong type")
        triples.append(RetrievalRecord(query=row["query"], pos=row["pos"], neg=row["neg"]))
    retrieval_rows = [
        {"query": r.query, "pos": r.pos[:1], "neg": r.neg[:negatives]}
        for r in dedup_retrieval(triples, index)
        if len(r.neg) >= max(negatives, 1)  # every row keeps the negatives stage 4 asks for
    ]

    pairs = []
    for line in (data / "parallel/cmn.txt").read_text(encoding="utf-8-sig").splitlines():
        cells = line.split("\t")
        if len(cells) >= 2 and cells[0].strip() and cells[1].strip() and clean(cells[0], cells[1]):
            pairs.append((cells[0].strip(), cells[1].strip()))
    rng = random.Random(seed)
    chinese = [zh for _, zh in pairs]
    clr_rows = [
        {
            "query": en,
            "pos": [zh],
            "neg": [c for c in rng.sample(chinese, negatives + 1) if c != zh][:negatives],
        }
        for en, zh in pairs
    ]
    paths = {}
    for name, rows in (("sts", sts_rows), ("retrieval", retrieval_rows), ("clr", clr_rows)):
        write_records(out / f"{name}.jsonl", rows)
        paths[name] = str(out / f"{name}.jsonl")
    return paths
