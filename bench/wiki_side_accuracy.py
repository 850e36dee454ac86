"""Where SCANet loses to semantic matching on single-label data: each side's class accuracy and the pair score.

    python bench/wiki_side_accuracy.py --data PREPARED/wiki RUN [RUN ...] [--out FILE]

On single-label data a pair's label ("same class?") is a function of the two class labels, so semantic matching
(a logistic regression per modality, cosine of the class posteriors) is the natural reference. This script asks
which part of a trained SCANet (its run folder's ``best.pt``) falls short of it:

* side accuracy: a test image's class is the class whose training texts score highest with it on average (and a
  test text's, against the training images), the same rule for SCANet's logits and semantic matching's scores;
* the pair score's ranking: test-vs-test MAP of the direct scores (the paper's retrieval) beside the MAP of
  class profiles, each test item represented by those per-class mean scores (z-scored) and matched by cosine.

Beside the runs, the prepared image features' headroom: the test accuracy of the baseline's linear logistic
regression on the standardized features and of an RBF-kernel SVM (both C = 1, sklearn defaults).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import warnings

import numpy as np
import torch

from scanet.baselines import _unit_rows, semantic_matching_split_scorer
from scanet.checkpoint import load_model
from scanet.data.prepared import PreparedDataset
from scanet.evaluate import model_scorer, retrieval_report


def class_profiles(scores: np.ndarray, candidate_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(queries, classes): each query's mean score against the candidates of each class."""
    return np.stack([scores[:, candidate_labels == c].mean(1) for c in range(n_classes)], 1)


def _z(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True)


def diagnose(score, ds: PreparedDataset) -> dict:
    """score(text_split, image_split) -> (n_text, n_image) scores; see the module docstring."""
    tr, te = ds.train, ds.test
    n_classes = int(max(tr.labels.max(), te.labels.max())) + 1
    image_profiles = class_profiles(score(tr, te).T, tr.labels, n_classes)  # test images vs training texts
    text_profiles = class_profiles(score(te, tr), tr.labels, n_classes)  # test texts vs training images
    direct = retrieval_report(score(te, te), te.labels, te.labels)
    profiles = retrieval_report(_unit_rows(_z(text_profiles)) @ _unit_rows(_z(image_profiles)).T, te.labels, te.labels)

    def maps(report: dict) -> dict:
        return {
            "text2image": report["text2image"]["map"],
            "image2text": report["image2text"]["map"],
            "mean": report["mean_map"],
        }

    return {
        "image_side_accuracy": float((image_profiles.argmax(1) == te.labels).mean()),
        "text_side_accuracy": float((text_profiles.argmax(1) == te.labels).mean()),
        "direct_scores": maps(direct),
        "class_profiles_z": maps(profiles),
    }


def feature_headroom(ds: PreparedDataset) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    scaler = StandardScaler().fit(ds.train.images)
    x_tr, x_te = scaler.transform(ds.train.images), scaler.transform(ds.test.images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        linear = LogisticRegression(C=1.0, max_iter=2000).fit(x_tr, ds.train.labels)
        rbf = SVC(C=1.0, kernel="rbf", gamma="scale").fit(x_tr, ds.train.labels)
    return {
        "image_dim": int(ds.train.images.shape[1]),
        "logistic_regression_accuracy": float((linear.predict(x_te) == ds.test.labels).mean()),
        "rbf_svm_accuracy": float((rbf.predict(x_te) == ds.test.labels).mean()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the prepared dataset folder the runs were trained on")
    p.add_argument("runs", nargs="+", help="run folders of scanet train (each with best.pt)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--out", help="JSON file to write (default: print)")
    args = p.parse_args(argv)
    ds = PreparedDataset.load(args.data)
    if ds.train.labels.ndim != 1:
        raise SystemExit(f"{args.data}: multi-label data; this diagnosis needs single-label classes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python bench/wiki_side_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "features": feature_headroom(ds),
            "semantic_matching": diagnose(semantic_matching_split_scorer(ds), ds),
            "runs": {},
        }
    for run in args.runs:
        model, _ = load_model(f"{run}/best.pt", ds)
        summary["runs"][run] = diagnose(model_scorer(model, precision=args.precision), ds)
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
