"""``scanet search index`` / ``scanet search query``: a search index of one side of a split, and queries on it
(scanet.index over scanet.retrieve)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from scanet import retrieve
from scanet.cli._common import dataset_options, load_trained
from scanet.config import flag_type
from scanet.fused._dispatch import PRECISIONS
from scanet.index import ANN_CHOICES, AUTO_EXHAUSTIVE_MAX, SIDES
from scanet.retrieve import STAGE1


def cmd_index(args) -> None:
    from scanet.data.text import read_stopwords
    from scanet.index import build_ann, build_index, save_index

    model, _, dataset = load_trained(args, args.preset)
    stop_file = Path(args.root) / "stopwords.txt" if args.root else None
    stopwords = read_stopwords(stop_file) if stop_file is not None and stop_file.is_file() else ()
    t0 = time.perf_counter()
    index = build_index(
        model,
        dataset,
        args.side,
        args.split,
        root=args.root,
        stopwords=stopwords,
        batch_size=args.batch_size,
        checkpoint=args.checkpoint,
        progress=True,
    )
    ann = None
    if args.ann != "none":
        if args.ann == "auto" and retrieve._faiss() is None:
            print(
                "FAISS is not installed (pip install faiss-cpu): no FAISS index; two-stage queries use the exact "
                "GEMM shortlist"
            )
        else:
            t1 = time.perf_counter()
            ann = build_ann(model, index, args.ann, args.ann_stage1, progress=True)
            ann_seconds = time.perf_counter() - t1
    save_index(index, args.out, ann)
    print(
        f"indexed {len(index['collection']['ids'])} {args.side} ({dataset.name}, {args.split} split) with model "
        f"{index['model_hash']} in {time.perf_counter() - t0:.1f} s -> {args.out}"
    )
    if ann is not None:
        print(
            f"FAISS {ann.kind} index of {len(ann)} {ann.stage1} vectors in {ann_seconds:.1f} s -> "
            f"{Path(args.out).with_name(index['ann']['file'])}"
        )


def cmd_query(args) -> None:
    from scanet.checkpoint import load_checkpoint, load_model
    from scanet.index import load_ann, load_index, search_index
    from scanet.plots import contact_sheet

    model, _ = load_model(load_checkpoint(args.checkpoint), None, device=args.device)
    model.eval()
    index = load_index(args.index, model)
    ann = None if args.no_ann else load_ann(index, args.index, model)
    result = search_index(
        model,
        index,
        text=args.text,
        text_id=args.text_id,
        image_id=args.image_id,
        top_k=args.top_k,
        shortlist=args.shortlist,
        stage1=args.stage1,
        precision=args.precision,
        ann=ann,
    )
    root = args.root or index.get("root")
    if args.contact_sheet:
        result["contact_sheet"] = str(contact_sheet(result, args.contact_sheet, root))
    if args.json:
        print(json.dumps(result, indent=1))
        return
    q = result["query"]
    if q["kind"] == "free text":
        print(f"query: free text {q['text']!r} ({q['known_words']} known words)")
        if q["unknown_words"]:
            print(f"unknown words (not in the model's vocabulary, ignored): {', '.join(q['unknown_words'])}")
        if q["stopwords_ignored"]:
            print(f"stop words ignored: {', '.join(q['stopwords_ignored'])}")
    else:
        print(f"query: {q['kind']} {q['id']} ({q['class']})")
    c = result["collection"]
    print(f"searched {c['size']} {c['modality']}s ({c['dataset']}, {c['split']} split), {result['mode']}")
    print(f"{'rank':>4}  {c['modality'] + ' id':<16} {'similarity':>10} {'logit':>10}  class")
    for r in result["results"]:
        print(f"{r['rank']:>4}  {r['id']:<16} {r['similarity']:>10.6f} {r['logit']:>10.4f}  {r['class']}")
    if args.contact_sheet:
        print(f"contact sheet: {result['contact_sheet']}")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="index one side of a dataset and query it (text <-> image)",
        description=retrieve.__doc__.split("\n\n")[0],
    )
    sub = p.add_subparsers(dest="search_command", required=True)

    pi = sub.add_parser("index", help="encode the images (or texts) of a split into a search index")
    pi.add_argument("--checkpoint", required=True, help="a training checkpoint (runs/<preset>/last.pt)")
    pi.add_argument("--preset", help="dataset preset to load (default: the checkpoint's)")
    dataset_options(pi, "raw data directory of the dataset (also where contact sheets find images)")
    pi.add_argument("--side", required=True, choices=sorted(SIDES), help="what the index holds (and returns)")
    pi.add_argument("--split", default="test", choices=["test", "train", "all"])
    pi.add_argument("--out", required=True, help="the index file to write (.pt)")
    pi.add_argument("--device", default="cpu")
    pi.add_argument(
        "--batch-size", type=flag_type(int, "--batch-size", lo=1), default=256, help="items encoded at a time"
    )
    pi.add_argument(
        "--ann",
        default="auto",
        choices=ANN_CHOICES,
        help="FAISS index beside the search index (<name>.faiss) for the two-stage shortlist: auto = "
        "when FAISS is installed, exact (flat) up to 100,000 items, HNSW above; none = no index",
    )
    pi.add_argument(
        "--ann-stage1",
        choices=STAGE1,
        help="the FAISS index's stage-1 score (default: layer2-mean for two-layer models, else layer1)",
    )
    pi.set_defaults(func=cmd_index)

    pq = sub.add_parser("query", help="top-k of one query against an index")
    pq.add_argument("--index", required=True)
    pq.add_argument("--checkpoint", required=True, help="the checkpoint the index was built with")
    g = pq.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="free text (tokenized as the training texts; images index)")
    g.add_argument("--text-id", help="a text of the indexed split, by id (images index)")
    g.add_argument("--image-id", help="an image of the indexed split, by id (texts index)")
    pq.add_argument("--top-k", type=flag_type(int, "--top-k", lo=1), default=10)
    pq.add_argument(
        "--shortlist",
        default="auto",
        help=f"two-stage shortlist size; 0 = exhaustive; auto = exhaustive up to {AUTO_EXHAUSTIVE_MAX} "
        "items, else max(20 k, 200)",
    )
    pq.add_argument(
        "--stage1",
        choices=STAGE1,
        help="the shortlist's score (default: the FAISS index's, else layer1); a score other than the "
        "FAISS index's uses the exact GEMM shortlist",
    )
    pq.add_argument("--no-ann", action="store_true", help="ignore the FAISS index: exact GEMM shortlist over all items")
    pq.add_argument(
        "--precision", default="fp32", choices=list(PRECISIONS), help="GEMM inputs of the fused scorer (CUDA only)"
    )
    pq.add_argument("--contact-sheet", help="write a PNG of the query and its results")
    pq.add_argument("--root", help="raw data directory for image files (default: the index's --root)")
    pq.add_argument("--device", default="cpu")
    pq.add_argument("--json", action="store_true", help="print the result as JSON")
    pq.set_defaults(func=cmd_query)
