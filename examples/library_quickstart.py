"""mics as a library, cell by cell (paste the cells into a notebook, or run this file).

Searches a small synthetic dataset with SIMULATED models (no model is called, nothing is
downloaded), opens the run, keeps the chains every intern sample confirmed (full score) and
builds a small training set from them.

    python examples/library_quickstart.py [WORKDIR]

In a notebook the event loop is already running: replace `anyio.run(main, ...)` by
`await main(...)`, or call `await mics.search(...)` directly in a cell.
"""

# %% setup
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import anyio

import mics
from mics.demo_data import write_demo_dataset

CONFIG = Path(__file__).with_name("simulated.toml")


async def main(workdir: Path) -> dict[str, int]:
    # %% questions: any iterable of Chiron/MMRP records (here: synthetic cases on disk)
    data, images = write_demo_dataset(workdir / "data", n=8)
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]

    # %% search: the owner stops it by setting `stop` (or cancelling); run it again to resume
    config = mics.load_config(CONFIG)
    stop = anyio.Event()
    summary = await mics.search(config, records, workdir / "run", image_root=images, stop=stop)
    print(f"searched {summary.questions}: {summary.succeeded} succeeded, "
          f"{summary.failed} failed; stop reasons {summary.stop_reasons}")

    # %% open the run: typed questions, outcomes and tree nodes
    with mics.open_run(workdir / "run") as run:
        full = list(run.outcomes("full_score"))
        print(f"{len(full)} chains with a full MICS-Score")
        for outcome in full[:1]:
            for node in run.path(outcome.qid)[1:]:
                print(f"  depth {node.depth + 1}: score {node.score:.2f} by {node.mentor}")
            graph = run.graph(outcome.qid)  # a networkx DiGraph of the whole search tree
            print(f"  tree of {outcome.qid}: {graph.number_of_nodes()} nodes")

        # %% your own records: question + images -> the verified chain, for your own loader.
        # (Trainer-ready files, e.g. InternVL's with one <image> per image in the prompt and the
        # final-answer line handled, come from run.export below, not from records like these.)
        train = []
        for outcome in full:
            question = run.question(outcome.qid)
            assert question is not None
            train.append({
                "id": outcome.qid,
                "question": question.question,
                "images": list(question.image_paths),
                "chain": outcome.reasoning,
                "generated_by": outcome.generated_by,
            })
        out = workdir / "train.jsonl"
        out.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
        print(f"wrote {len(train)} training records to {out}")

        # %% the standard exports, with the same filter (what `mics export` writes)
        counts = run.export(workdir / "export", ["reference", "sft"], only_full_score=True)
        print(f"exports: {counts}")
    return {"questions": summary.questions, "full_score": len(full), "train": len(train),
            **{f"export_{k}": v for k, v in counts.items()}}


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="mics-"))
    print(json.dumps(anyio.run(main, where)))
