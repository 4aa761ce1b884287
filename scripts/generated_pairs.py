"""Helpers of scripts/generated_pairs.sh (issue #15 part 5): the passages, the scores, the report.

python scripts/generated_pairs.py passages --out DIR   # SciFact docs no test query cites
python scripts/generated_pairs.py score --out DIR --model NAME --path MODEL
python scripts/generated_pairs.py report --out DIR
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import time
from pathlib import Path

from conan_embedding.data.sources import resolve_data_dir

WORDS = 120  # passages cut to their first 120 words: the prompt stays short for a 135M model


def _qrels(root: Path, split: str) -> set[tuple[str, str]]:
    with open(root / "qrels" / f"{split}.tsv", encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))[1:]
    return {(row[0], row[1]) for row in rows if row}


def passages(out: Path) -> None:
    """``passages.jsonl``: documents cited by SciFact *train* queries and by no test query;
    ``human.jsonl``: those train queries with their documents (the human-written arm)."""
    root = resolve_data_dir(None) / "retrieval" / "scifact"
    train, test = _qrels(root, "train"), _qrels(root, "test")
    wanted = {doc for _, doc in train} - {doc for _, doc in test}
    corpus = {}
    with gzip.open(root / "corpus.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["_id"] in wanted:
                text = f"{row['title']}. {row['text']}".split()
                corpus[row["_id"]] = " ".join(text[:WORDS])
    queries = {}
    with open(root / "queries.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            queries[row["_id"]] = row["text"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "passages.jsonl", "w", encoding="utf-8") as handle:
        for doc in sorted(corpus):
            handle.write(json.dumps({"text": corpus[doc], "doc_id": doc}) + "\n")
    with open(out / "human.jsonl", "w", encoding="utf-8") as handle:
        for query, doc in sorted(train):
            if doc in corpus:
                handle.write(json.dumps({"query": queries[query], "pos": [corpus[doc]]}) + "\n")
    print(f"{len(corpus)} passages, human queries on them: {out / 'human.jsonl'}")


def score(out: Path, name: str, path: str) -> None:
    from conan_embedding.evaluation.run import evaluate

    started = time.perf_counter()
    scores = evaluate(path, ["SciFact"], output_dir=out / "results", cache_dir=False,
                      show_progress=False, model_name=f"minilm-{name}", num_threads=1)  # fmt: skip
    payload = {"SciFact": scores["SciFact"], "seconds": round(time.perf_counter() - started, 1)}
    (out / f"scores-{name}.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"{name}: SciFact nDCG@10 {scores['SciFact'] * 100:.2f}")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def report(out: Path) -> None:
    import numpy as np

    from conan_embedding.data.builders.filter import pair_scores
    from conan_embedding.modeling.embedder import load_embedder

    gen = out / "gen"
    generated, kept = _rows(gen / "queries.jsonl"), _rows(gen / "queries.filtered.jsonl")
    made = json.loads((gen / "generate.report.json").read_text(encoding="utf-8"))
    filtered = json.loads((gen / "filter.report.json").read_text(encoding="utf-8"))
    teacher = load_embedder(filtered.get("teacher") or "all-MiniLM-L6-v2")
    cosine = pair_scores(teacher, [r["query"] for r in generated],
                         [r["pos"][0] for r in generated], show_progress=False)  # fmt: skip
    order = np.argsort(cosine)
    examples = {
        "best": [(generated[i]["query"], float(cosine[i])) for i in order[::-1][:5]],
        "worst": [(generated[i]["query"], float(cosine[i])) for i in order[:5]],
    }
    scores = {
        name: json.loads((out / f"scores-{name}.json").read_text(encoding="utf-8"))
        for name in ("base", "generated", "filtered", "human")
        if (out / f"scores-{name}.json").is_file()
    }
    summary = {
        "generation": made,
        "generation_seconds": (out / "generation.seconds").read_text().strip()
        if (out / "generation.seconds").is_file()
        else None,
        "filter": filtered,
        "generated_pairs": len(generated),
        "kept_pairs": len(kept),
        "drop_rate": 1 - len(kept) / max(len(generated), 1),
        "examples": examples,
        "scores": scores,
        "human_pairs": len(_rows(out / "human.jsonl")),
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    labels = {
        "base": "all-MiniLM-L6-v2, no training",
        "generated": f"+ {len(generated)} generated pairs (unfiltered)",
        "filtered": f"+ {len(kept)} generated pairs, teacher-filtered (cos >= 0.4)",
        "human": f"+ {summary['human_pairs']} human train queries, same documents",
    }
    lines = ["| model | SciFact nDCG@10 |", "|---|---|"]
    lines += [f"| {labels[k]} | {v['SciFact'] * 100:.2f} |" for k, v in scores.items()]
    lines += ["", f"Generated {len(generated)} queries for {made['passages']} passages; "
              f"the teacher kept {len(kept)} (drop rate {summary['drop_rate']:.0%}).", "",
              "Best (teacher cosine):", ""]  # fmt: skip
    lines += [f"- {q!r} ({c:.2f})" for q, c in examples["best"]]
    lines += ["", "Worst:", ""] + [f"- {q!r} ({c:.2f})" for q, c in examples["worst"]]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("step", choices=["passages", "score", "report"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model")
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.step == "passages":
        passages(args.out)
    elif args.step == "score":
        score(args.out, args.model, args.path)
    else:
        report(args.out)


if __name__ == "__main__":
    main()
