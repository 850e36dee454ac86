"""NUS-WIDE (Chua et al. 2009) in its official release layout, or the ``XAll``/``YAll``/``LAll`` .mat bundles.

Why over 400 lines: one dataset, two released layouts (the official folder tree and the .mat bundle),
the paper's subset selection with the release's quirks, and the checks that name the file and line.

Official layout (ROOT):
    Low_Level_Features/BoW_Train_int.dat, BoW_Test_int.dat   500-d bag of visual words (SIFT), integers separated
                                                              by spaces, one image a line (161,789 / 107,859 lines)
    NUS_WID_Tags/Train_Tags1k.dat, Test_Tags1k.dat            1000-d 0/1 tag indicators, tab separated (each line
                                                              ends with a tab in the release), one image a line
    NUS_WID_Tags/TagList1k.txt                                the 1,000 tag words, in column order
    NUS_WID_Tags/All_Tags.txt, Final_Tag_List.txt             optional: every image's raw tags ("<photo id> tag
                                                              tag ...", 269,648 lines in Imagelist order) and the
                                                              5,018-tag list, for the paper's 5,018-vertex graph
    Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt   0/1 a line (or Groundtruth.zip, as released)
    ConceptsList/Concepts81.txt                                the 81 concept names (or ConceptsList.zip)
    ImageList/TrainImagelist.txt, TestImagelist.txt            image names ("actor\\0001_2124494179.jpg"), the
                                                              item ids; ImageList/Imagelist.txt (all 269,648)
                                                              maps All_Tags.txt rows to the splits

The paper's subset: the ``n_concepts`` largest concepts (count of positive images over Train + Test), the images
with exactly one of them (``exactly_one``; False keeps images with any of them, multi-hot labels), images without
any tag in the vocabulary left out (``drop_untagged``), then ``n_train`` drawn from the official Train split and
``n_test`` from the official Test split with ``seed``. On the real ground truth the 10 largest concepts are sky,
clouds, person, water, animal, grass, buildings, window, plants, lake; 111,810 Train + 74,767 Test = 186,577 images
have at least one of them (the size of the literature's NUS-WIDE-TC10) and 58,620 Train / 38,955 Test exactly one
(tests/test_nuswide.py checks this against Groundtruth.zip). One value of the release is not 0/1:
Labels_lake_Train.txt line 78,373 reads -1130179. It is read as 0 (AllLabels/Labels_lake.txt agrees: 13,392
positives) and listed in the report; a loader that sums the raw integers ranks lake last and takes ocean instead.

Text side: the tags as words. ``tags="1k"`` reads Tags1k.dat (1,000 tags), ``"all"`` reads All_Tags.txt
restricted to Final_Tag_List.txt (5,018 tags, the paper's graph), ``"auto"`` takes "all" when those files and
ImageList/Imagelist.txt are present. Tag vectors: GloVe (or ``embeddings``), compound tags as the mean of their
parts (scanet.data.tag_words); tags without a vector are not graph vertices. Word graph: kNN (k = ``knn``).

Image side: ``image_features="bow500"`` (BoW_int.dat) or a path to an .npy matrix with one row per official image,
Train rows then Test rows (161,789 + 107,859), e.g. CNN features computed elsewhere.

.mat bundle (ROOT has no Groundtruth): ``nus-wide-tc10-xall*.mat`` (``XAll``, (n, D) image features),
``nus-wide-tc10-yall.mat`` (``YAll``, (n, 1000) tag counts in TagList1k.txt order) and ``nus-wide-tc10-lall.mat``
(``LAll``, (n, C) multi-hot), or one .mat holding all three keys; TagList1k.txt (in ROOT or ROOT/NUS_WID_Tags)
names the tag columns. No split is stored in these files, so ``n_test`` items are drawn as the test split and
``n_train`` of the rest (all of the rest with n_train=None). Matrices stored transposed (items as columns, as
some copies have them) are turned around. MATLAB v7.3 (HDF5) files are not read.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from scanet.data.embeddings import GLOVE_50D, load_word_vectors
from scanet.data.graph import word_graph
from scanet.data.prepared import PreparedDataset, Split, cached, hash_files
from scanet.data.tag_words import tag_word_vectors
from scanet.data.text import bag_of_words, build_vocabulary
from scanet.io import safe_np_load

SPLITS = ("Train", "Test")
N_OFFICIAL = {"Train": 161_789, "Test": 107_859}
REPORT_NAME = "preparation_report.json"


# ------------------------------------------------------------------------------------------- raw files
class Release:
    """Reads release files from ROOT, falling back to the zip archives as released (Groundtruth.zip holds
    ``TrainTestLabels/...`` and ``AllLabels/...``; ConceptsList.zip holds ``Concepts81.txt``)."""

    ZIPS = {"Groundtruth": "Groundtruth.zip", "ConceptsList": "ConceptsList.zip"}

    def __init__(self, root: Path):
        self.root = Path(root)
        self._zips: dict[str, zipfile.ZipFile] = {}

    def _zip_member(self, rel: str) -> tuple[Path, str] | None:
        top, _, inner = rel.partition("/")
        z = self.root / self.ZIPS.get(top, "")
        if top not in self.ZIPS or not z.is_file():
            return None
        if top not in self._zips:
            self._zips[top] = zipfile.ZipFile(z)
        names = set(self._zips[top].namelist())
        for member in (inner, rel):  # with or without the top folder inside the zip
            if member in names:
                return z, member
        return None

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file() or self._zip_member(rel) is not None

    def where(self, rel: str) -> str:
        if (self.root / rel).is_file():
            return str(self.root / rel)
        found = self._zip_member(rel)
        return f"{found[0]}:{found[1]}" if found else str(self.root / rel)

    def read(self, rel: str) -> bytes:
        if (self.root / rel).is_file():
            return (self.root / rel).read_bytes()
        found = self._zip_member(rel)
        if found is None:
            zips = f" (or {self.root / self.ZIPS[rel.split('/')[0]]})" if rel.split("/")[0] in self.ZIPS else ""
            raise FileNotFoundError(f"NUS-WIDE file missing: {self.root / rel}{zips}")
        return self._zips[rel.split("/")[0]].read(found[1])

    def files_read(self, rels) -> list[Path]:
        """The files on disk behind ``rels`` (a zip once), for the manifest's input hashes."""
        out = []
        for rel in rels:
            p = self.root / rel
            if p.is_file():
                out.append(p)
            elif self._zip_member(rel) is not None:
                out.append(self.root / self.ZIPS[rel.split("/")[0]])
        return sorted(set(out))


def _lines(raw: bytes, where: str) -> list[bytes]:
    lines = raw.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{where} is empty")
    return lines


def read_concepts(rel: Release) -> list[str]:
    names = [
        ln.strip().decode("utf-8")
        for ln in _lines(rel.read("ConceptsList/Concepts81.txt"), rel.where("ConceptsList/Concepts81.txt"))
        if ln.strip()
    ]
    if len(set(names)) != len(names):
        raise ValueError(f"{rel.where('ConceptsList/Concepts81.txt')}: concept names repeat")
    return names


def read_label_file(
    rel: Release, concept: str, split: str, n_rows: int | None = None, notes: list | None = None
) -> np.ndarray:
    """(n,) bool of Groundtruth/TrainTestLabels/Labels_<concept>_<split>.txt, checked: an integer a line, and
    ``n_rows`` lines when given (every concept's file of a split has one line per image of the split).

    An integer other than 0 or 1 counts as 0 and is noted (file, line, value) in ``notes``: the release has one,
    Labels_lake_Train.txt line 78,373 reads -1130179.
    """
    name = f"Groundtruth/TrainTestLabels/Labels_{concept}_{split}.txt"
    where = rel.where(name)
    tokens = rel.read(name).split()
    if n_rows is not None and len(tokens) != n_rows:
        raise ValueError(
            f"{where} has {len(tokens)} lines, expected {n_rows} like the other concepts' "
            f"{split} files (one per {split} image)"
        )
    odd = [i for i, t in enumerate(tokens) if t not in (b"0", b"1")]
    for i in odd:
        try:
            value = int(tokens[i])
        except ValueError:
            raise ValueError(f"{where}:{i + 1}: expected 0 or 1, got {tokens[i].decode(errors='replace')!r}") from None
        if notes is not None:
            notes.append({"file": name, "line": i + 1, "value": value, "read_as": 0})
    return (
        np.asarray([t == b"1" for t in tokens], dtype=bool)
        if odd
        else np.frombuffer(b"".join(tokens), dtype=np.uint8) == ord("1")
    )


class MatrixFile:
    """A whitespace-separated integer matrix file with one image a line (BoW_int.dat, Tags1k.dat), checked for
    its line count on first use and parsed only at the rows asked for (the Tags1k files hold 162M values)."""

    def __init__(self, path: Path, n_lines: int, width: int, what: str):
        self.path, self.n_lines, self.width, self.what = Path(path), n_lines, width, what
        self._lines: list[bytes] | None = None

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), width) float32 of the 0-based line numbers ``rows``."""
        if self._lines is None:
            if not self.path.is_file():
                raise FileNotFoundError(f"NUS-WIDE {self.what} file missing: {self.path}")
            self._lines = _lines(self.path.read_bytes(), str(self.path))
            if len(self._lines) != self.n_lines:
                raise ValueError(
                    f"{self.path} has {len(self._lines)} lines, expected {self.n_lines} (one per image of the split)"
                )
        out = np.empty((len(rows), self.width), np.float32)
        for k, r in enumerate(rows):
            parts = self._lines[r].split()
            if len(parts) != self.width:
                raise ValueError(f"{self.path}:{r + 1}: expected {self.width} values, got {len(parts)}")
            try:
                out[k] = np.asarray(parts, dtype=np.float64)
            except ValueError:
                raise ValueError(f"{self.path}:{r + 1}: values must be numbers") from None
        if not np.isfinite(out).all():
            raise ValueError(f"{self.path}: NaN or inf among the selected rows")
        return out


def read_word_list(path: Path, n: int | None = None) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"NUS-WIDE tag list missing: {path}")
    words = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if n is not None and len(words) != n:
        raise ValueError(f"{path} has {len(words)} tags, expected {n}")
    return words


def read_image_list(path: Path, n: int) -> list[str]:
    names = [
        ln.strip().replace("\\", "/")
        for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
        if ln.strip()
    ]
    if len(names) != n:
        raise ValueError(f"{path} has {len(names)} image names, expected {n}")
    return names


# ---------------------------------------------------------------------------------------- the subset
def rank_concepts(rel: Release, concepts: list[str], notes: list | None = None) -> tuple[list[str], dict[str, int]]:
    """All concepts by their number of positive images over Train + Test (largest first, ties by name)."""
    n_rows = split_sizes(rel, concepts)
    counts = {c: int(sum(read_label_file(rel, c, s, n_rows[s], notes).sum() for s in SPLITS)) for c in concepts}
    return sorted(concepts, key=lambda c: (-counts[c], c)), counts


def split_sizes(rel: Release, concepts: list[str]) -> dict[str, int]:
    """Images per official split: the line count of the first concept's label files (161,789 and 107,859 in the
    release; the other files are checked against it)."""
    return {s: len(read_label_file(rel, concepts[0], s)) for s in SPLITS}


def select_candidates(
    rel: Release, n_concepts: int = 10, concepts: list[str] | None = None, exactly_one: bool = True
) -> dict:
    """The selected concepts and, per official split, the candidate rows and their (n, C) bool labels.

    Candidates: images with exactly one selected concept (exactly_one), else with at least one.
    """
    all_concepts = read_concepts(rel)
    notes: list[dict] = []
    if concepts:
        unknown = [c for c in concepts if c not in all_concepts]
        if unknown:
            raise ValueError(f"concepts {unknown} are not in Concepts81.txt")
        chosen, counts = list(concepts), None
    else:
        if not 1 <= n_concepts <= len(all_concepts):
            raise ValueError(f"n_concepts must be in 1..{len(all_concepts)}, got {n_concepts}")
        ranked, counts = rank_concepts(rel, all_concepts, notes)
        chosen = ranked[:n_concepts]
    n_rows = split_sizes(rel, all_concepts)
    out: dict[str, Any] = {
        "concepts": chosen,
        "concept_counts": counts,
        "rows": {},
        "labels": {},
        "n_rows": n_rows,
        "label_anomalies": notes,
    }
    for s in SPLITS:
        Y = np.stack([read_label_file(rel, c, s, n_rows[s], [] if counts else notes) for c in chosen], axis=1)
        k = Y.sum(axis=1)
        keep = np.flatnonzero(k == 1) if exactly_one else np.flatnonzero(k >= 1)
        out["rows"][s], out["labels"][s] = keep, Y[keep]
    return out


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int | None, ok, what: str) -> np.ndarray:
    """``n`` items of ``pool`` in a seeded random order, skipping those ``ok`` rejects (checked lazily in
    chunks, so that only about n items are ever parsed). Sorted, so files are read in order."""
    order = rng.permutation(len(pool))
    want = len(pool) if n is None else n
    if want > len(pool):
        raise ValueError(f"{what}: {want} items asked for but only {len(pool)} candidates exist")
    taken: list = []
    pos = 0
    while len(taken) < want and pos < len(order):
        chunk = pool[order[pos : pos + max(2 * (want - len(taken)), 64)]]
        pos += len(chunk)
        good = chunk[ok(chunk)]
        taken.extend(good[: want - len(taken)].tolist())
    if len(taken) < want and n is not None:
        raise ValueError(
            f"{what}: only {len(taken)} of the {len(pool)} candidates have a tag in the vocabulary, {want} asked for"
        )
    return np.sort(np.asarray(taken, dtype=np.int64))


# ------------------------------------------------------------------------------------------- prepare
def bow_file(root: Path, split: str) -> Path:
    """Low_Level_Features/BoW_<split>_int.dat, or the one file of that name below Low_Level_Features/ (unpacked
    archives put it in a subfolder such as BoW_int/)."""
    name = f"BoW_{split}_int.dat"
    direct = root / "Low_Level_Features" / name
    if direct.is_file() or not (root / "Low_Level_Features").is_dir():
        return direct
    found = sorted((root / "Low_Level_Features").rglob(name))
    if len(found) > 1:
        raise ValueError(f"several {name} below {root / 'Low_Level_Features'}: {[str(p) for p in found]}")
    return found[0] if found else direct


def _is_official(root: Path) -> bool:
    return (root / "Groundtruth").is_dir() or (root / "Groundtruth.zip").is_file()


def _mat_bundle(root: Path) -> dict[str, Path] | None:
    mats = sorted(root.glob("*.mat"))
    found = {}
    for key, pattern in (("XAll", "xall"), ("YAll", "yall"), ("LAll", "lall")):
        hits = [p for p in mats if pattern in p.name.lower()]
        if len(hits) > 1:
            raise ValueError(f"{root}: several .mat files could hold {key}: {[p.name for p in hits]}")
        if hits:
            found[key] = hits[0]
    if len(found) == 3:
        return found
    if len(mats) == 1:
        return {k: mats[0] for k in ("XAll", "YAll", "LAll")}
    return None


def _resolve_tags(root: Path, tags: str) -> str:
    if tags not in ("auto", "1k", "all"):
        raise ValueError(f"tags must be 'auto', '1k' or 'all', got {tags!r}")
    if tags != "auto":
        return tags
    full = [
        root / "NUS_WID_Tags" / "All_Tags.txt",
        root / "NUS_WID_Tags" / "Final_Tag_List.txt",
        root / "ImageList" / "Imagelist.txt",
    ]
    return "all" if all(p.is_file() for p in full) else "1k"


def prepare(
    root: str | Path,
    out_dir: str | Path | None = None,
    *,
    n_concepts: int = 10,
    concepts: list[str] | None = None,
    exactly_one: bool = True,
    n_train: int | None = 40_000,
    n_test: int | None = 1_000,
    seed: int = 0,
    tags: str = "auto",
    drop_untagged: bool = True,
    vocab_size: int = 5018,
    knn: int = 8,
    embeddings: str = GLOVE_50D,
    lmax: str | float = "exact",
    image_features: str = "bow500",
    progress=print,
) -> PreparedDataset:
    """Prepare NUS-WIDE (cached in ``out_dir``, default ``prepared/nuswide``); see the module doc."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"NUS-WIDE data directory not found: {root}")
    out_dir = Path(out_dir or Path("prepared") / "nuswide")
    if not _is_official(root):
        bundle = _mat_bundle(root)
        if bundle is None:
            raise FileNotFoundError(
                f"{root} is neither the official NUS-WIDE layout (Groundtruth/ or Groundtruth.zip is missing) nor "
                "a .mat bundle (nus-wide-tc10-xall*.mat, -yall.mat, -lall.mat, or one .mat with XAll, YAll, LAll)"
            )
        return _prepare_bundle(
            root,
            out_dir,
            bundle,
            exactly_one=exactly_one,
            n_train=n_train,
            n_test=n_test,
            seed=seed,
            drop_untagged=drop_untagged,
            vocab_size=vocab_size,
            knn=knn,
            embeddings=embeddings,
            lmax=lmax,
            progress=progress,
        )
    rel = Release(root)
    tag_source = _resolve_tags(root, tags)
    tag_dir, img_dir = root / "NUS_WID_Tags", root / "ImageList"
    needed = ["ConceptsList/Concepts81.txt"]
    for f in needed:
        if not rel.exists(f):
            raise FileNotFoundError(f"NUS-WIDE file missing: {root / f} (or {root / 'ConceptsList.zip'})")
    concept_names = read_concepts(rel)
    label_rels = [f"Groundtruth/TrainTestLabels/Labels_{c}_{s}.txt" for c in concept_names for s in SPLITS]
    missing = [r for r in label_rels if not rel.exists(r)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} ground-truth files missing, e.g. {root / missing[0]}")
    if tag_source == "1k":
        text_files = [tag_dir / f"{s}_Tags1k.dat" for s in SPLITS] + [tag_dir / "TagList1k.txt"]
    else:
        text_files = [tag_dir / "All_Tags.txt", tag_dir / "Final_Tag_List.txt", img_dir / "Imagelist.txt"]
    list_files = [img_dir / f"{s}Imagelist.txt" for s in SPLITS]
    if tag_source == "all":
        for list_file in list_files:
            if not list_file.is_file():
                raise FileNotFoundError(
                    f"tags='all' maps All_Tags.txt rows to the splits by name: {list_file} is missing"
                )
    if image_features == "bow500":
        image_files = [bow_file(root, s) for s in SPLITS]
    else:
        image_files = [Path(image_features)]
    for input_file in text_files + image_files:
        if not input_file.is_file():
            raise FileNotFoundError(f"NUS-WIDE file missing: {input_file}")
    inputs = {
        "labels": hash_files(rel.files_read(label_rels + ["ConceptsList/Concepts81.txt"])),
        "texts": hash_files(text_files),
        "images": hash_files(image_files),
        "image_lists": hash_files([f for f in list_files if f.is_file()])
        if any(f.is_file() for f in list_files)
        else "missing",
    }
    if embeddings != GLOVE_50D:
        inputs["embeddings"] = hash_files([Path(embeddings)])
    params = {
        "dataset": "nuswide",
        "n_concepts": n_concepts,
        "concepts": concepts,
        "exactly_one": exactly_one,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "tags": tag_source,
        "drop_untagged": drop_untagged,
        "vocab_size": vocab_size,
        "knn": knn,
        "embeddings": str(embeddings),
        "lmax": lmax,
        "image_features": str(image_features),
        "tag_vectors": "compound-mean-v1",
    }
    report: dict = {}

    def build() -> PreparedDataset:
        progress(f"selecting the NUS-WIDE subset from {rel.where('Groundtruth/TrainTestLabels')}")
        sel = select_candidates(rel, n_concepts, concepts, exactly_one)
        wv0 = load_word_vectors(embeddings)
        if tag_source == "1k":
            words = read_word_list(tag_dir / "TagList1k.txt", 1000)
        else:
            words = read_word_list(tag_dir / "Final_Tag_List.txt")
        wv, how = tag_word_vectors(words, wv0)
        progress(
            f"{len(wv.words)} of {len(words)} tags have a vector in {wv0.name} "
            f"({sum(h.startswith('mean') for h in how.values())} as the mean of their parts)"
        )
        n_rows = sel["n_rows"]
        if n_rows != N_OFFICIAL:
            progress(f"note: {n_rows} images per split, not the release's {N_OFFICIAL}")
        token_rows = _tag_reader(root, tag_source, words, set(wv.words), n_rows)
        rng = np.random.default_rng(seed)
        drawn, toks = {}, {}
        for s, n in (("Train", n_train), ("Test", n_test)):
            parsed: dict[int, list[str]] = {}

            def has_tags(rows, s=s, parsed=parsed):
                fresh = [int(r) for r in rows if int(r) not in parsed]
                if fresh:
                    parsed.update(zip(fresh, token_rows(s, np.asarray(fresh, np.int64)), strict=True))
                return np.asarray([bool(parsed[int(r)]) or not drop_untagged for r in rows], dtype=bool)

            drawn[s] = _draw(rng, sel["rows"][s], n, has_tags, f"NUS-WIDE {s}")
            toks[s] = [parsed[int(r)] for r in drawn[s]]
        vocab = build_vocabulary(toks["Train"], vocab_size)
        progress(f"vocabulary: {len(vocab)} tags; building the {knn}-NN tag graph")
        lap, lm = word_graph(wv.lookup(vocab), knn, lmax)
        names = {
            s: (
                read_image_list(img_dir / f"{s}Imagelist.txt", n_rows[s])
                if (img_dir / f"{s}Imagelist.txt").is_file()
                else None
            )
            for s in SPLITS
        }
        feats = _image_reader(root, image_features, n_rows)
        splits, per_concept = {}, {}
        for s in SPLITS:
            Y = sel["labels"][s][np.searchsorted(sel["rows"][s], drawn[s])]
            per_concept[s] = dict(zip(sel["concepts"], Y.sum(axis=0).tolist(), strict=True))
            labels = Y.argmax(axis=1).astype(np.int64) if exactly_one else Y.astype(bool)
            split_names = names[s]
            ids = [split_names[r] if split_names else f"{s}/{r + 1}" for r in drawn[s]]
            splits[s] = Split(ids, ids, bag_of_words(toks[s], vocab), feats(s, drawn[s]), labels)
        ds = PreparedDataset("nuswide", vocab, lap, lm, list(sel["concepts"]), splits["Train"], splits["Test"])
        report.update(
            {
                "concepts": sel["concepts"],
                "concept_counts_train_plus_test": sel["concept_counts"],
                "candidates": {s: int(len(sel["rows"][s])) for s in SPLITS},
                "candidates_per_concept": {
                    s: dict(zip(sel["concepts"], sel["labels"][s].sum(0).tolist(), strict=True)) for s in SPLITS
                },
                "drawn": {s: int(len(drawn[s])) for s in SPLITS},
                "drawn_per_concept": per_concept,
                "label_anomalies": sel["label_anomalies"],
                "tags": tag_source,
                "tag_vectors": {t: h for t, h in how.items() if h != "own vector"},
                "vocab_size": len(vocab),
                "texts_without_vocabulary_tag": {s: int(sum(not t for t in toks[s])) for s in SPLITS},
            }
        )
        return ds

    ds = cached(out_dir, params, inputs, build, progress)
    if report:
        (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1), encoding="utf-8")
        progress(
            f"NUS-WIDE: {report['drawn']['Train']} train / {report['drawn']['Test']} test of "
            f"{report['candidates']['Train']} / {report['candidates']['Test']} candidates, concepts "
            f"{', '.join(report['concepts'])}; report: {out_dir / REPORT_NAME}"
        )
    return ds


def _tag_reader(root: Path, tag_source: str, words: list[str], with_vector: set[str], n_rows: dict):
    """token_rows(split, rows) -> per row the tags that have a vector (one token per tag)."""
    tag_dir = root / "NUS_WID_Tags"
    if tag_source == "1k":
        files = {s: MatrixFile(tag_dir / f"{s}_Tags1k.dat", n_rows[s], len(words), "tag") for s in SPLITS}

        def tag_rows_1k(split, rows):
            m = files[split].rows(rows)
            return [
                [words[j] for j in np.flatnonzero(r) if words[j] in with_vector for _ in range(int(r[j]))] for r in m
            ]

        return tag_rows_1k
    state: dict = {}

    def token_rows(split, rows):
        if not state:
            n_all = sum(n_rows.values())
            all_names = read_image_list(root / "ImageList" / "Imagelist.txt", n_all)
            index = {n: i for i, n in enumerate(all_names)}
            path = tag_dir / "All_Tags.txt"
            lines = _lines(path.read_bytes(), str(path))
            if len(lines) != n_all:
                raise ValueError(f"{path} has {len(lines)} lines, expected {n_all} (one per image, Imagelist order)")
            state["lines"], state["path"] = lines, path
            for s in SPLITS:
                names = read_image_list(root / "ImageList" / f"{s}Imagelist.txt", n_rows[s])
                missing = [n for n in names if n not in index]
                if missing:
                    raise ValueError(
                        f"{root / 'ImageList' / f'{s}Imagelist.txt'}: {len(missing)} names are not in "
                        f"Imagelist.txt, e.g. {missing[:3]}"
                    )
                state[s] = np.asarray([index[n] for n in names], np.int64)
        out = []
        for r in rows:
            parts = state["lines"][state[split][r]].decode("utf-8", errors="replace").split()
            out.append([t.lower() for t in parts[1:] if t.lower() in with_vector])  # parts[0]: the photo id
        return out

    return token_rows


def _image_reader(root: Path, image_features: str, n_rows: dict):
    if image_features == "bow500":
        files = {s: MatrixFile(bow_file(root, s), n_rows[s], 500, "image feature") for s in SPLITS}
        return lambda split, rows: files[split].rows(rows)
    m = safe_np_load(image_features, "image feature matrix", mmap_mode="r")
    n_all = sum(n_rows.values())
    if m.ndim != 2 or m.shape[0] != n_all:
        raise ValueError(
            f"{image_features}: expected ({n_all}, D) features (Train rows, then Test rows), got shape {m.shape}"
        )

    def feats(split, rows):
        off = 0 if split == "Train" else n_rows["Train"]
        a = np.asarray(m[rows + off], dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{image_features}: NaN or inf among the selected rows")
        return a

    return feats


# ------------------------------------------------------------------------------------------ .mat bundle
def _load_mat_key(path: Path, key: str) -> np.ndarray:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=[key])
    except NotImplementedError:
        raise ValueError(
            f"{path} is a MATLAB v7.3 (HDF5) file, which is not read here; save it as v7 "
            "(MATLAB: save(name, '-v7')) or pass the official release"
        ) from None
    except Exception as e:  # scipy raises several types for a broken file
        raise ValueError(f"cannot read {path}: {e}") from e
    if key not in mat:
        raise ValueError(f"{path} has no variable {key!r}")
    a = mat[key]
    return a.toarray() if hasattr(a, "toarray") else np.asarray(a)


def _prepare_bundle(
    root: Path,
    out_dir: Path,
    files: dict[str, Path],
    *,
    exactly_one,
    n_train,
    n_test,
    seed,
    drop_untagged,
    vocab_size,
    knn,
    embeddings,
    lmax,
    progress,
) -> PreparedDataset:
    tag_list = next((p for p in (root / "TagList1k.txt", root / "NUS_WID_Tags" / "TagList1k.txt") if p.is_file()), None)
    if tag_list is None:
        raise FileNotFoundError(
            f"{root}: the .mat bundle's YAll columns are tags; their words come from "
            "TagList1k.txt (in ROOT or ROOT/NUS_WID_Tags), which is missing"
        )
    inputs = {"bundle": hash_files(sorted(set(files.values())) + [tag_list])}
    if embeddings != GLOVE_50D:
        inputs["embeddings"] = hash_files([Path(embeddings)])
    params = {
        "dataset": "nuswide",
        "source": "mat-bundle",
        "exactly_one": exactly_one,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "drop_untagged": drop_untagged,
        "vocab_size": vocab_size,
        "knn": knn,
        "embeddings": str(embeddings),
        "lmax": lmax,
        "tag_vectors": "compound-mean-v1",
    }
    report: dict = {}

    def build() -> PreparedDataset:
        X = _load_mat_key(files["XAll"], "XAll").astype(np.float32)
        Y = _load_mat_key(files["YAll"], "YAll").astype(np.float32)
        L = _load_mat_key(files["LAll"], "LAll")
        # Some copies store the matrices transposed (items as columns); the labels have far fewer columns
        # (concepts) than rows (items), which tells the orientation.
        if L.ndim == 2 and L.shape[0] < L.shape[1]:
            L = L.T
        n = L.shape[0]
        X, Y = (a.T if a.ndim == 2 and a.shape[0] != n and a.shape[1] == n else a for a in (X, Y))
        if X.ndim != 2 or Y.ndim != 2 or L.ndim != 2 or Y.shape[0] != n or L.shape[0] != n:
            raise ValueError(f"XAll {X.shape}, YAll {Y.shape} and LAll {L.shape} must be 2-D with one row per item")
        if not np.isin(L, (0, 1)).all():
            raise ValueError(f"{files['LAll']}: LAll must be 0/1 (multi-hot), found other values")
        if not (np.isfinite(Y).all() and (Y >= 0).all()):
            raise ValueError(f"{files['YAll']}: YAll must hold finite non-negative tag counts")
        words = read_word_list(tag_list, Y.shape[1])
        wv, how = tag_word_vectors(words, load_word_vectors(embeddings))
        have = set(wv.words)
        cols = [j for j, w in enumerate(words) if w in have]
        k = L.sum(axis=1)
        pool = np.flatnonzero(k == 1) if exactly_one else np.flatnonzero(k >= 1)
        if drop_untagged:
            pool = pool[Y[pool][:, cols].sum(axis=1) > 0]
        rng = np.random.default_rng(seed)
        order = rng.permutation(pool)
        nt = len(order) // 5 if n_test is None else n_test
        if nt + (n_train or 0) > len(order):
            raise ValueError(f"{len(order)} usable items, {nt} test + {n_train} train asked for")
        test_rows = np.sort(order[:nt])
        train_rows = np.sort(order[nt:] if n_train is None else order[nt : nt + n_train])

        Yc = Y[:, cols]

        def toks(rows):
            return [
                [words[cols[j]] for j in np.flatnonzero(Yc[r]) for _ in range(max(1, int(round(Yc[r, j]))))]
                for r in rows
            ]

        tok = {"train": toks(train_rows), "test": toks(test_rows)}
        vocab = build_vocabulary(tok["train"], vocab_size)
        lap, lm = word_graph(wv.lookup(vocab), knn, lmax)
        classes = [f"class{i + 1}" for i in range(L.shape[1])]

        def split(rows, t):
            labels = L[rows].argmax(axis=1).astype(np.int64) if exactly_one else L[rows].astype(bool)
            ids = [str(r + 1) for r in rows]
            return Split(ids, ids, bag_of_words(t, vocab), X[rows], labels)

        report.update(
            {
                "source": {k: str(v) for k, v in files.items()},
                "items": int(n),
                "usable": int(len(pool)),
                "drawn": {"train": int(len(train_rows)), "test": int(len(test_rows))},
                "tag_vectors": {t: h for t, h in how.items() if h != "own vector"},
                "vocab_size": len(vocab),
                "classes": "LAll columns, named class1..classC (the .mat files carry no names)",
            }
        )
        return PreparedDataset(
            "nuswide", vocab, lap, lm, classes, split(train_rows, tok["train"]), split(test_rows, tok["test"])
        )

    ds = cached(out_dir, params, inputs, build, progress)
    if report:
        (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1), encoding="utf-8")
        progress(
            f"NUS-WIDE .mat bundle: {report['drawn']['train']} train / {report['drawn']['test']} test of "
            f"{report['usable']} usable items; report: {out_dir / REPORT_NAME}"
        )
    return ds
