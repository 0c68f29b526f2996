"""Rebuild `debian-sample.jsonl.gz` and `debian-sample-queries.jsonl.gz` from debian-ir.

The sample `twostage quickstart` ingests: 2,500 package descriptions drawn (seeded) from
debian-ir's corpus plus the 500 first dev packages, whose synopses are the labelled queries
(`{query, doc_id}`) that tests and `twostage evaluate` can score the sample with. Debian
package descriptions are written by Debian maintainers and upstream authors (DFSG-free).

    python api/cli/samples/build_sample.py ../shared/data/debian-ir
"""

import gzip
import json
import random
import sys
from pathlib import Path

CORPUS_DOCS = 2500
DEV_DOCS = 500


def main(data: Path, out: Path) -> None:
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").open(encoding="utf-8")]
    dev = [json.loads(line) for line in (data / "dev.jsonl").open(encoding="utf-8")][:DEV_DOCS]
    docs = random.Random(0).sample(corpus, CORPUS_DOCS)
    docs += [
        {
            "_id": d["package"],
            "title": "",
            "text": d["positive"],
            "source": d["package"],
            "section": d["section"],
        }
        for d in dev
    ]
    docs.sort(key=lambda d: d["_id"])
    rows = [{k: d[k] for k in ("_id", "title", "text", "source", "section")} for d in docs]
    queries = [{"query": d["query"], "doc_id": d["package"]} for d in dev]
    for name, items in (("debian-sample.jsonl.gz", rows), ("debian-sample-queries.jsonl.gz", queries)):
        # mtime=0: the same input gives the same bytes
        with gzip.GzipFile(out / name, "wb", mtime=0) as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items).encode())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent)
