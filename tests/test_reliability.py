"""Bad inputs and faults (issue 14): nothing lost, nothing executed, nothing silently wrong.

Table-driven over the command line: each case is (case, setup -> argv, expected exit code, message fragment),
run through ``scanet.cli.main`` with stderr captured (argparse's exit 2 included). One row per rule of
docs/reliability.md, the issue's examples and more. Faults are real where this machine allows it: a small
tmpfs for a full disk, a read-only tmpfs for a read-only folder (root ignores chmod), a child process killed
with SIGKILL in the middle of a checkpoint write; where ``mount`` is not allowed the same faults are
monkeypatched writes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scanet.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, preset_from_dict
from scanet.cli import main
from scanet.config import get_preset
from scanet.data import prepare
from scanet.data.prepared import PreparedDataset, Split
from scanet.io import atomic_torch_save, sha256_file

warnings.filterwarnings("ignore", message="Sparse")

SMALL = [
    "--set",
    "positive_pairs=200",
    "--set",
    "negative_pairs=200",
    "--set",
    "common_dim=16",
    "--set",
    "batch_size=64",
]
TRAIN = ["train", "--eager", "--no-baseline", "--set", "epochs=1", *SMALL]


def cli(argv, capsys):
    """(exit code, stdout, stderr) of ``scanet ARGV``."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


class _Payload:
    """Unpickling this calls ``open(marker, 'w')``: the code a malicious file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared synthetic cache and a finished 1-epoch run (copied by the tests that change it)."""
    root = tmp_path_factory.mktemp("reliability")
    rc = main([*TRAIN, "--prepared-dir", str(root / "prepared"), "--out", str(root / "run")])
    assert rc == 0
    return root


def fresh_run(world, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    return run


def write_custom(root: Path, settings: dict | None = None, n: int = 24) -> Path:
    """A custom-format folder with precomputed matrices (tag counts + 6-d image features)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["sky", "sea", "beach", "car", "road", "city", "tree", "grass"]
    counts = np.zeros((n, len(words)), np.float32)
    for i in range(n):
        counts[i, rng.choice(len(words), 3)] += 1
    sp.save_npz(root / "text_features.npz", sp.csr_matrix(counts))
    (root / "text_ids.txt").write_text("\n".join(f"doc{i}" for i in range(n)))
    (root / "vocab.txt").write_text("\n".join(words))
    np.save(root / "image_features.npy", rng.normal(size=(n, 6)).astype(np.float32))
    (root / "image_ids.txt").write_text("\n".join(f"img{i}" for i in range(n)))
    lines = [f"doc{i}\timg{i}\t{i % 3 + 1}" for i in range(n)]
    (root / "train.tsv").write_text("\n".join(lines[:16]))
    (root / "test.tsv").write_text("\n".join(lines[16:]))
    (root / "dataset.json").write_text(
        json.dumps({"language": "whitespace", "knn": 3, "vocab_size": 6, **(settings or {})})
    )
    return root


# ============================================================================ rule 1: loading never runs code
def _evil_checkpoint(world, path: Path, marker: Path, valid: bool):
    state = load_checkpoint(world / "run" / "last.pt") if valid else {"format": CHECKPOINT_FORMAT, "model": {}}
    state["payload"] = _Payload(marker)
    torch.save(state, path)


@pytest.mark.parametrize(
    "case,argv,fragment",
    [
        (
            "evaluate, payload in a valid checkpoint",
            lambda w, t: [
                "evaluate",
                "--checkpoint",
                t / "evil.pt",
                "--prepared-dir",
                w / "prepared",
                "--out",
                t / "e",
            ],
            "corrupt or not a SCANet checkpoint",
        ),
        (
            "train --resume, payload in the run's last.pt",
            lambda w, t: [*TRAIN, "--prepared-dir", w / "prepared", "--out", t / "evilrun", "--resume"],
            "corrupt or not a SCANet checkpoint",
        ),
        (
            "search query, payload in the index",
            lambda w, t: [
                "search",
                "query",
                "--index",
                t / "evil.pt",
                "--checkpoint",
                w / "run" / "last.pt",
                "--text",
                "x",
            ],
            "corrupt or not a search index",
        ),
    ],
)
def test_rule1_no_code_runs_on_load(world, tmp_path, capsys, case, argv, fragment):
    marker = tmp_path / "code_ran"
    _evil_checkpoint(world, tmp_path / "evil.pt", marker, valid=True)
    (tmp_path / "evilrun").mkdir()
    shutil.copy(tmp_path / "evil.pt", tmp_path / "evilrun" / "last.pt")
    rc, _, err = cli(argv(world, tmp_path), capsys)
    assert rc == 2 and fragment in err, (case, err)
    assert not marker.exists(), f"{case}: the payload ran"


@pytest.mark.parametrize(
    "case,content,fragment",
    [
        ("strings", lambda p: np.save(p, np.array(["a", "b"] * 12).reshape(24, 1)), "holds strings"),
        (
            "pickled objects",
            lambda p: np.save(p, np.array([{"a": 1}] * 24, dtype=object), allow_pickle=True),
            "Python objects (a pickle), which are never loaded",
        ),
        ("random bytes", lambda p: p.write_bytes(os.urandom(500)), "is not a NumPy .npy/.npz file"),
        ("empty file", lambda p: p.write_bytes(b""), "(empty)"),
        (
            "truncated",
            lambda p: (np.save(p, np.zeros((24, 6), np.float32)), p.write_bytes(p.read_bytes()[:200])),
            "truncated or damaged",
        ),
    ],
)
def test_rule1_rule8_custom_image_features(tmp_path, capsys, case, content, fragment):
    root = write_custom(tmp_path / "c")
    content(root / "image_features.npy")
    rc, _, err = cli(["prepare", "custom", "--root", root, "--out", tmp_path / "p"], capsys)
    assert rc == 2 and fragment in err and "image_features.npy" in err, (case, err)
    assert "allow_pickle=True" not in err  # numpy's advice to trust a pickle is not passed on


# ============================================================================ rule 2: saved work never overwritten
def test_rule2_existing_run_refused_force_replaces(world, tmp_path, capsys):
    run = fresh_run(world, tmp_path)
    before = {f: sha256_file(run / f) for f in ("last.pt", "metrics.json", "results.json")}
    rc, _, err = cli([*TRAIN, "--prepared-dir", world / "prepared", "--out", run], capsys)
    assert rc == 2 and "already holds a run" in err and "--force" in err
    assert {f: sha256_file(run / f) for f in before} == before  # nothing touched
    rc, out, _ = cli([*TRAIN, "--prepared-dir", world / "prepared", "--out", run, "--force", "--set", "seed=3"], capsys)
    assert rc == 0 and "--force: replacing the run" in out
    assert load_checkpoint(run / "last.pt")["preset"]["train"]["seed"] == 3


@pytest.mark.parametrize(
    "case,extra,rc_want,fragment",
    [
        ("no checkpoint: says it starts fresh", "empty", 0, "no checkpoint at"),
        ("no checkpoint but results.json: refused", "no-ckpt", 2, "metrics.json, evaluation.json, results.json"),
        ("same config, finished: nothing to train", [], 0, "already done all 1 epochs"),
        ("larger epochs extends the finished run", ["--set", "epochs=2"], 0, "extending the run"),
        ("lr changed: refused, key named", ["--set", "lr=0.002"], 2, "train.lr (saved 0.001, given 0.002)"),
        (
            "two keys changed: both named",
            ["--set", "dropout=0.3", "--set", "seed=5"],
            2,
            "model.dropout (saved 0.0, given 0.3), train.seed (saved 0, given 5)",
        ),
        ("N changed: refused", ["--set", "common_dim=32"], 2, "model.common_dim (saved 16, given 32)"),
    ],
)
def test_rule2_resume_rules(world, tmp_path, capsys, case, extra, rc_want, fragment):
    run = fresh_run(world, tmp_path)
    if extra == "empty":
        shutil.rmtree(run)
        extra = []
    if extra == "no-ckpt":
        (run / "last.pt").unlink()
        extra = []
    rc, out, err = cli([*TRAIN, "--prepared-dir", world / "prepared", "--out", run, "--resume", *extra], capsys)
    assert rc == rc_want and fragment in (out + err), (case, out[-500:], err)
    if case.startswith("larger"):
        assert len(json.loads((run / "metrics.json").read_text())) == 2  # epoch 1 kept, epoch 2 added


def test_rule2_fewer_epochs_than_done_refused(world, tmp_path, capsys):
    run = fresh_run(world, tmp_path)
    assert (
        cli([*TRAIN, "--prepared-dir", world / "prepared", "--out", run, "--resume", "--set", "epochs=2"], capsys)[0]
        == 0
    )
    rc, _, err = cli([*TRAIN, "--prepared-dir", world / "prepared", "--out", run, "--resume"], capsys)
    assert rc == 2 and "has done 2 epochs; epochs=1 is fewer" in err


def test_rule2_lock_held_by_a_live_process_refused_stale_lock_taken_over(world, tmp_path, capsys):
    from scanet.run_folder import claim

    run = fresh_run(world, tmp_path)
    ds = PreparedDataset.load(world / "prepared" / "synthetic")
    preset = preset_from_dict(load_checkpoint(run / "last.pt")["preset"])
    holder = claim(run, preset, ds.fingerprint, resume=True, log=lambda s: None)
    try:
        rc, _, err = cli([*TRAIN, "--prepared-dir", world / "prepared", "--out", run, "--resume"], capsys)
        assert rc == 2 and f"in use by process {os.getpid()}" in err
    finally:
        holder.release()
    # A second process holding the lock: refused as well (flock is per open file, across processes).
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        rc, _, err = cli([*TRAIN, "--prepared-dir", world / "prepared", "--out", run, "--resume"], capsys)
        assert rc == 2 and f"in use by process {child.pid}" in err
    finally:
        child.kill()
        child.wait()
    # The child is dead (kill -9 is the same): its lock file still names it, but nobody holds it.
    rc, out, _ = cli([*TRAIN, "--prepared-dir", world / "prepared", "--out", run, "--resume"], capsys)
    assert rc == 0 and f"stale lock of process {child.pid}" in out
    (run / ".lock").write_text(f"{dead_pid()}\n")
    rc, out, _ = cli([*TRAIN, "--prepared-dir", world / "prepared", "--out", run, "--resume"], capsys)
    assert rc == 0 and "stale lock" in out
    assert preset  # the run was a real one


def test_rule2_evaluate_never_overwrites_the_run(world, tmp_path, capsys):
    run = fresh_run(world, tmp_path)
    before = {f: sha256_file(run / f) for f in ("results.json", "pr_curves.png", "metrics.json", "last.pt")}
    argv = ["evaluate", "--checkpoint", run / "last.pt", "--prepared-dir", world / "prepared", "--eager"]
    rc, out, _ = cli(argv, capsys)
    assert rc == 0 and (run / "evaluate_results.json").is_file()
    assert {f: sha256_file(run / f) for f in before} == before  # training's baseline rows kept
    rc, _, err = cli(argv, capsys)
    assert rc == 2 and "evaluate_results.json already exists" in err and "--force" in err
    assert cli([*argv, "--force"], capsys)[0] == 0


def test_rule2_evaluate_root_keeps_a_cache_prepared_with_other_options(world, tmp_path, capsys):
    """The cache was prepared with knn=4 (not the preset's 8): evaluate uses it, never rebuilds it."""
    pdir = tmp_path / "prepared"
    prepare("synthetic", out_dir=pdir / "synthetic", knn=4, progress=lambda s: None)
    manifest = sha256_file(pdir / "synthetic" / "manifest.json")
    assert cli([*TRAIN, "--data", pdir / "synthetic", "--out", tmp_path / "run"], capsys)[0] == 0
    rc, _, err = cli(
        ["evaluate", "--checkpoint", tmp_path / "run" / "last.pt", "--prepared-dir", pdir, "--eager"], capsys
    )
    assert rc == 0, err
    assert sha256_file(pdir / "synthetic" / "manifest.json") == manifest
    # Now the cache holds other prepared data (the defaults): refused, and left as it is.
    prepare("synthetic", out_dir=pdir / "synthetic", progress=lambda s: None)
    manifest = sha256_file(pdir / "synthetic" / "manifest.json")
    rc, _, err = cli(
        [
            "evaluate",
            "--checkpoint",
            tmp_path / "run" / "last.pt",
            "--prepared-dir",
            pdir,
            "--eager",
            "--out",
            tmp_path / "e",
        ],
        capsys,
    )
    assert rc == 2 and "not rebuilt with the preset's defaults" in err and "knn" in err
    assert sha256_file(pdir / "synthetic" / "manifest.json") == manifest


# ============================================================================ rules 3-4: every setting checked
SET_CASES = [
    ("epochs=abc", "epochs='abc': epochs must be an int >= 1"),
    ("epochs=0", "epochs=0: epochs must be an int >= 1"),
    ("epochs=-1", "epochs=-1: epochs must be an int >= 1"),
    ("epochs=2.5", "epochs=2.5: epochs must be an int >= 1"),
    ("batch_size=0", "batch_size=0: batch_size must be an int >= 1"),
    ("batch_size=-8", "batch_size=-8: batch_size must be an int >= 1"),
    ("lr=nan", "lr=nan: lr must be a finite float > 0"),
    ("lr=inf", "lr=inf: lr must be a finite float > 0"),
    ("lr=0", "lr=0: lr must be a finite float > 0"),
    ("weight_decay=-0.1", "weight_decay=-0.1: weight_decay must be a finite float >= 0"),
    ("score_chunk=0", "score_chunk=0: score_chunk must be an int >= 1"),
    ("positive_pairs=0", "positive_pairs=0: positive_pairs must be an int >= 1"),
    ("dropout=1.0", "dropout=1.0: dropout must be a finite float in [0, 1)"),
    ("common_dim=0", "common_dim=0: common_dim must be an int >= 1"),
    ("cheb_k=0", "cheb_k=0: cheb_k must be an int >= 1"),
    ("gcn_channels=(0,)", "gcn_channels=(0,): gcn_channels must be a non-empty tuple of ints >= 1"),
    ("attention_scale=2", "attention_scale='2': attention_scale must be one of 'n', '1'"),
    ("encoder_activation=gelu", "encoder_activation must be one of 'none', 'relu', 'tanh'"),
    ("seed=-1", "seed=-1: seed must be an int in [0, 9.22337e+18]"),
    ("eval_every=-1", "eval_every=-1: eval_every must be an int >= 0"),
    ("decoupled_weight_decay=yes", "decoupled_weight_decay must be True or False"),
    ("vocab_size=0", "vocab_size=0: vocab_size must be an int >= 1 or None"),
    ("epoch=3", "unknown config key 'epoch'"),
]


@pytest.mark.parametrize("override,fragment", SET_CASES, ids=[c[0] for c in SET_CASES])
def test_rule4_set_values_are_typed_and_range_checked(tmp_path, capsys, override, fragment):
    rc, out, err = cli(["train", "--out", tmp_path / "run", "--set", override], capsys)
    assert rc == 2 and fragment in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was made


FLAG_CASES = [
    (
        "evaluate --chunk-size 0",
        lambda w, t: ["evaluate", "--checkpoint", w / "run" / "last.pt", "--chunk-size", 0],
        "--chunk-size=0: --chunk-size must be an int >= 1",
    ),
    (
        "evaluate --chunk-size -3",
        lambda w, t: ["evaluate", "--checkpoint", "x", "--chunk-size", -3],
        "--chunk-size must be an int >= 1",
    ),
    (
        "evaluate --chunk-size abc",
        lambda w, t: ["evaluate", "--checkpoint", "x", "--chunk-size", "abc"],
        "--chunk-size='abc'",
    ),
    (
        "prepare --knn 0",
        lambda w, t: ["prepare", "wiki", "--root", t, "--knn", 0],
        "--knn=0: --knn must be an int >= 1",
    ),
    (
        "prepare --vocab-size -5",
        lambda w, t: ["prepare", "wiki", "--root", t, "--vocab-size", -5],
        "--vocab-size must be an int >= 1",
    ),
    (
        "search query --top-k 0",
        lambda w, t: ["search", "query", "--index", "i.pt", "--checkpoint", "c.pt", "--text", "x", "--top-k", 0],
        "--top-k=0: --top-k must be an int >= 1",
    ),
    (
        "search index --batch-size 0",
        lambda w, t: ["search", "index", "--checkpoint", "c", "--side", "images", "--out", "o", "--batch-size", 0],
        "--batch-size must be an int >= 1",
    ),
    (
        "features images --batch-size 0",
        lambda w, t: ["features", "images", "--root", t, "--out", "o.npy", "--batch-size", 0],
        "--batch-size must be an int >= 1",
    ),
]


@pytest.mark.parametrize("case,argv,fragment", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_rule3_cli_sizes_are_range_checked(world, tmp_path, capsys, case, argv, fragment):
    rc, _, err = cli(argv(world, tmp_path), capsys)
    assert rc == 2 and fragment in err, err


@pytest.mark.parametrize(
    "settings,fragment",
    [
        ({"knn": 0}, "dataset.json: knn=0: knn must be an int >= 1"),
        ({"knn": "8"}, "knn='8': knn must be an int >= 1"),
        ({"knn": 2.5}, "knn=2.5"),
        ({"vocab_size": -1}, "vocab_size=-1: vocab_size must be an int >= 1"),
        ({"batch_size": 0}, "batch_size=0: batch_size must be an int >= 1"),
    ],
)
def test_rule4_dataset_json_is_range_checked(tmp_path, capsys, settings, fragment):
    root = write_custom(tmp_path / "c", settings)
    rc, _, err = cli(["prepare", "custom", "--root", root, "--out", tmp_path / "p"], capsys)
    assert rc == 2 and fragment in err, err


def test_rule3_checkpoint_settings_are_checked_too(world, tmp_path, capsys):
    state = load_checkpoint(world / "run" / "last.pt")
    state["preset"]["train"]["score_chunk"] = 0
    atomic_torch_save(tmp_path / "bad.pt", state)
    rc, _, err = cli(["evaluate", "--checkpoint", tmp_path / "bad.pt", "--prepared-dir", world / "prepared"], capsys)
    assert rc == 2 and "checkpoint setting score_chunk=0: score_chunk must be an int >= 1" in err


def test_rule3_library_chunks_are_checked():
    from scanet.model import SCANet
    from scanet.reference import pair_logits

    model = SCANet(5, 3, sp.identity(5, format="csr", dtype=np.float32), get_preset("synthetic").model)
    t, i = torch.rand(4, 5), torch.rand(4, 3)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
            model.score_all(t, i, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_pairs=0"):
        pair_logits(model, model.encode_text(t), model.encode_image(i), chunk_pairs=0)
    assert model.score_all(t, i, chunk_size=1).shape == (4, 4)


# ============================================================================ rule 5: a bad cache is rebuilt
def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x10
    p.write_bytes(bytes(b))


CACHE_FAULTS = [
    ("arrays.npz truncated", "arrays.npz", _truncate),
    ("arrays.npz emptied", "arrays.npz", lambda p: p.write_bytes(b"")),
    ("arrays.npz bit flipped", "arrays.npz", _flip),
    ("vocab.txt deleted", "vocab.txt", Path.unlink),
    ("vocab.txt one word changed", "vocab.txt", lambda p: p.write_text(p.read_text().replace("\n", "x\n", 1))),
    ("meta.json deleted", "meta.json", Path.unlink),
    ("manifest.json garbage", "manifest.json", lambda p: p.write_bytes(b"\xff\x00garbage")),
]


@pytest.mark.parametrize("case,name,damage", CACHE_FAULTS, ids=[c[0] for c in CACHE_FAULTS])
def test_rule5_damaged_cache_is_detected_and_rebuilt(world, tmp_path, capsys, case, name, damage):
    cache = tmp_path / "synthetic"
    shutil.copytree(world / "prepared" / "synthetic", cache)
    good = PreparedDataset.load(cache).fingerprint
    damage(cache / name)
    if name != "manifest.json":  # a given folder (--data) is refused, naming the problem
        rc, _, err = cli([*TRAIN, "--data", cache, "--out", tmp_path / "r"], capsys)
        assert rc == 2 and str(cache) in err and ("missing" in err or "sha256" in err or "corrupt" in err), err
    rc, out, _ = cli(["prepare", "synthetic", "--out", cache], capsys)  # prepare rebuilds it
    assert rc == 0 and "rebuilding" in out, out
    assert PreparedDataset.load(cache).fingerprint == good
    damage(cache / name)  # and the training load sequence does too
    rc, out, _ = cli([*TRAIN, "--prepared-dir", tmp_path, "--out", tmp_path / "r2"], capsys)
    assert rc == 0 and "rebuilding" in out


def test_rule5_nan_feature_cache_is_recomputed_not_blamed_on_images(tmp_path):
    from PIL import Image

    import scanet.features as sf
    from scanet.features import extract_cached

    spec = sf.ImageModelSpec(
        "meancolour",
        3,
        "test stand-in",
        8,
        1.0,
        "bilinear",
        (0.0,) * 3,
        (255.0,) * 3,
        lambda: (lambda x: x.mean(dim=(2, 3)), None),
        lambda: "stand-in-1",
    )
    sf.IMAGE_MODELS[spec.name] = spec
    try:
        files = []
        for k in range(3):
            f = tmp_path / f"im{k}.png"
            Image.new("RGB", (8, 8), (40 * k, 10, 200)).save(f)
            files.append(f)
        out = tmp_path / "feats.npy"
        first = extract_cached(files, [f.name for f in files], out, "meancolour", progress=False, log=lambda s: None)
        np.save(out, np.full_like(first.features, np.nan))  # the cache filled with NaN (bad disk, bad copy)
        logs = []
        again = extract_cached(files, [f.name for f in files], out, "meancolour", progress=False, log=logs.append)
        np.testing.assert_array_equal(again.features, first.features)
        assert again.computed == 3 and not again.failed and any("sha256" in m for m in logs), logs
        # an old manifest without the hash: the NaN rows alone are recomputed
        m = json.loads(out.with_name("feats.manifest.json").read_text())
        m.pop("features_sha256")
        out.with_name("feats.manifest.json").write_text(json.dumps(m))
        feats = first.features.copy()
        feats[1] = np.nan
        np.save(out, feats)
        logs = []
        again = extract_cached(files, [f.name for f in files], out, "meancolour", progress=False, log=logs.append)
        assert again.computed == 1 and np.isfinite(again.features).all() and any("NaN" in m for m in logs)
    finally:
        del sf.IMAGE_MODELS[spec.name]


# ============================================================================ rule 6: refused at preparation
def _split(n, d, V=4, labels=None):
    return Split(
        [f"t{i}" for i in range(n)],
        [f"i{i}" for i in range(n)],
        sp.csr_matrix((n, V), dtype=np.float32),
        np.zeros((n, d), np.float32),
        np.zeros(n, np.int64) if labels is None else labels,
    )


@pytest.mark.parametrize(
    "case,train,test,fragment",
    [
        (
            "image widths differ",
            _split(4, 5),
            _split(3, 7),
            "train image features are 5-d but test image features are 7-d",
        ),
        ("bow narrower than vocab", _split(4, 5, V=3), _split(3, 5), "train bag-of-words has 3 columns for 4 words"),
        (
            "label beyond the classes",
            _split(4, 5, labels=np.array([0, 1, 2, 5])),
            _split(3, 5),
            "train labels lie in [0, 5] but there are 2 classes",
        ),
        ("negative label", _split(4, 5), _split(3, 5, labels=np.array([0, -1, 1])), "test labels lie in [-1, 1]"),
        ("label kinds differ", _split(4, 5), _split(3, 5, labels=np.zeros((3, 2), bool)), "different kinds"),
        ("empty test split", _split(4, 5), _split(0, 5), "a split is empty"),
    ],
)
def test_rule6_impossible_datasets_refused_when_made(case, train, test, fragment):
    with pytest.raises(ValueError, match="cannot be trained on") as e:
        PreparedDataset(
            "d", ["a", "b", "c", "d"], sp.identity(4, format="csr", dtype=np.float32), 2.0, ["x", "y"], train, test
        )
    assert fragment in str(e.value), (case, str(e.value))


def test_rule6_split_of_strings_refused():
    with pytest.raises(ValueError, match="image features must be numbers"):
        Split(["a"], ["a"], sp.csr_matrix((1, 2)), np.array([["x", "y"]]), np.zeros(1, np.int64))


def test_rule6_saved_dataset_with_mismatched_widths_refused_before_training(world, tmp_path, capsys):
    ds = PreparedDataset.load(world / "prepared" / "synthetic")
    arrays = dict(np.load(world / "prepared" / "synthetic" / "arrays.npz"))
    arrays["test_images"] = np.zeros((len(ds.test), ds.image_dim + 3), np.float32)
    shutil.copytree(world / "prepared" / "synthetic", tmp_path / "d")
    np.savez(tmp_path / "d" / "arrays.npz", **arrays)
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())  # hashes made to agree: the data
    m["outputs"]["arrays.npz"] = sha256_file(tmp_path / "d" / "arrays.npz")  # itself is what is impossible
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    rc, out, err = cli([*TRAIN, "--data", tmp_path / "d", "--out", tmp_path / "r"], capsys)
    assert rc == 2 and "train image features are 32-d but test image features are 35-d" in err
    assert "epoch" not in out


# ============================================================================ rule 7: no segfault
def _csr(crow, col, V=3):
    return torch.sparse_csr_tensor(
        torch.tensor(crow), torch.tensor(col), torch.ones(len(col)), (V, V), check_invariants=False
    )


BAD_CSR = [
    ("column beyond V", [0, 1, 2, 3], [0, 1, 5], "column indices out of range [0, 3): min 0, max 5"),
    ("huge column", [0, 1, 2, 3], [0, 1, 2**40], "column indices out of range"),
    ("negative column", [0, 1, 2, 3], [0, -1, 2], "column indices out of range"),
    ("crow jumps past nnz", [0, 5, 2, 3], [0, 1, 2], "malformed crow_indices"),
    ("crow decreasing", [0, 2, 1, 3], [0, 1, 2], "malformed crow_indices"),
    ("crow ends short", [0, 1, 2, 2], [0, 1, 2], "malformed crow_indices"),
    ("crow starts at 1", [1, 1, 2, 3], [0, 1, 2], "malformed crow_indices"),
    ("unsorted row", [0, 2, 2, 3], [1, 0, 2], "unsorted column indices"),
]


@pytest.mark.parametrize("op", ["reference", "native", "fused"])
@pytest.mark.parametrize("case,crow,col,fragment", BAD_CSR, ids=[c[0] for c in BAD_CSR])
def test_rule7_raw_csr_checked_by_every_cheb_conv(op, case, crow, col, fragment):
    import scanet.fused
    import scanet.native
    import scanet.reference

    if op == "native" and not scanet.native.available():
        pytest.skip(f"native backend not built here: {scanet.native.unavailable_reason()}")
    fn = {"reference": scanet.reference.cheb_conv, "native": scanet.native.cheb_conv, "fused": scanet.fused.cheb_conv}[
        op
    ]
    with pytest.raises(ValueError, match="laplacian_csr") as e:
        fn(_csr(crow, col), torch.randn(2, 3, 1), torch.randn(2, 1, 1))
    assert fragment in str(e.value), (case, str(e.value))


def test_rule7_checked_once_per_tensor_and_again_after_an_in_place_change():
    import scanet.laplacian as lap
    from scanet.reference import cheb_conv

    L = _csr([0, 1, 2, 3], [0, 1, 2])
    x, w = torch.randn(2, 3, 1), torch.randn(2, 1, 1)
    calls = []
    real = lap.check_csr_indices
    lap.check_csr_indices = lambda *a: (calls.append(1), real(*a))[1]
    try:
        for _ in range(3):
            cheb_conv(L, x, w)
        assert len(calls) == 1  # once for this tensor, not per call
        L.col_indices()[2] = 7  # written in place: checked again, and refused
        with pytest.raises(ValueError, match="out of range"):
            cheb_conv(L, x, w)
        L2 = _csr([0, 1, 2, 3], [0, 1, 2])  # the fused path's operator: built once per tensor
        op = lap.Laplacian.of(L2)
        assert lap.Laplacian.of(L2) is op
        L2.values()[0] = 5.0  # new values: a new operator (symmetry, transpose)
        assert lap.Laplacian.of(L2) is not op and float(lap.Laplacian.of(L2).values[0]) == 5.0
        layer = lap.Laplacian(sp.identity(3, format="csr", dtype=np.float32))
        n = len(calls)
        cheb_conv(layer, x, w)
        assert len(calls) == n  # a Laplacian's CSR is born checked
    finally:
        lap.check_csr_indices = real


LAPLACIAN_CORRUPTIONS = [
    ("crow out of range", lambda m: m["laplacian.crow"].__setitem__(1, 10**9), "malformed crow_indices"),
    ("column out of range", lambda m: m["laplacian.col"].__setitem__(0, 10**6), "column indices out of range"),
    ("crow truncated", lambda m: m.__setitem__("laplacian.crow", m["laplacian.crow"][:-5]), "malformed"),
    ("values missing", lambda m: m.__setitem__("laplacian.values", m["laplacian.values"][:-1]), "values"),
]


def test_rule7_evaluate_eager_on_a_corrupted_laplacian(world, tmp_path):
    """In a child process (one for all cases), so that a segfault would be exit -11, not a crashed test run."""
    paths = []
    for k, (_case, corrupt, _fragment) in enumerate(LAPLACIAN_CORRUPTIONS):
        state = load_checkpoint(world / "run" / "last.pt")
        corrupt(state["model"])
        atomic_torch_save(tmp_path / f"bad{k}.pt", state)
        paths.append(str(tmp_path / f"bad{k}.pt"))
    code = (
        "import contextlib, io, json, sys, warnings; warnings.simplefilter('ignore')\n"
        "from scanet.cli import main\nout = []\n"
        f"for k, ckpt in enumerate({paths!r}):\n"
        "    err = io.StringIO()\n    with contextlib.redirect_stderr(err):\n"
        f"        rc = main(['evaluate', '--checkpoint', ckpt, '--prepared-dir', {str(world / 'prepared')!r}, "
        f"'--eager', '--out', {str(tmp_path)!r} + f'/e{{k}}'])\n"
        "    out.append([rc, err.getvalue()])\nprint(json.dumps(out))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])),
    )
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    for (case, _, fragment), (rc, err) in zip(
        LAPLACIAN_CORRUPTIONS, json.loads(p.stdout.splitlines()[-1]), strict=True
    ):
        assert rc == 2 and "malformed Laplacian" in err and fragment in err, (case, rc, err)


# ============================================================================ rule 8: errors name file + problem
@pytest.mark.parametrize(
    "case,target,fragment",
    [
        ("train.tsv", "train.tsv", "train.tsv (list file) is not UTF-8 text: byte 0xe9 at line 2"),
        ("vocab.txt", "vocab.txt", "vocab.txt (vocabulary) is not UTF-8 text"),
        ("image_ids.txt", "image_ids.txt", "image_ids.txt (id list) is not UTF-8 text"),
        ("dataset.json", "dataset.json", "dataset.json (settings) is not UTF-8 text"),
    ],
)
def test_rule8_non_utf8_files_named(tmp_path, capsys, case, target, fragment):
    root = write_custom(tmp_path / "c")
    p = root / target
    lines = p.read_bytes().split(b"\n")
    lines[min(1, len(lines) - 1)] += b" caf\xe9"
    if target == "dataset.json":
        lines = [b'{"knn": 3, "name": "caf\xe9"}']
    p.write_bytes(b"\n".join(lines))
    rc, _, err = cli(["prepare", "custom", "--root", root, "--out", tmp_path / "p"], capsys)
    assert rc == 2 and fragment.split(" (")[0] in err and "is not UTF-8 text" in err, err
    assert "codec can't decode" not in err


@pytest.fixture
def small_mount(tmp_path):
    """mount(size, ro=False) -> a tmpfs folder; None where mounting is not allowed (then writes are patched)."""
    mounted = []

    def make(size: str, ro: bool = False):
        d = tmp_path / f"mnt{len(mounted)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            return None
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_rule8_full_disk_during_checkpoint_write(world, tmp_path, capsys, small_mount, monkeypatch):
    out = small_mount("64k")
    if out is None:  # no mount here: the same failure, patched into the write
        import errno

        out = tmp_path / "full"

        def full_save(obj, fh):
            fh.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(torch, "save", full_save)
    rc, _, err = cli([*TRAIN, "--prepared-dir", world / "prepared", "--out", out / "run"], capsys)
    assert rc == 2 and "no space left on the device" in err and ("last.pt" in err or "best.pt" in err), err
    assert "inline_container" not in err.split("no space left")[0]
    assert not list((out / "run").glob("*.tmp"))  # the partial file is removed


def test_rule8_torch_writer_failure_on_a_full_disk_is_a_sentence(tmp_path, small_mount, monkeypatch):
    from scanet.io import atomic_torch_save as save

    out = small_mount("64k") or tmp_path  # patched: free space is what decides
    if out == tmp_path:
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1024))

    def failing_save(obj, fh):
        fh.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4416 vs 4344")

    monkeypatch.setattr(torch, "save", failing_save)
    (out / "last.pt").write_bytes(b"previous")
    with pytest.raises(OSError) as e:
        save(out / "last.pt", {"a": 1})
    assert e.value.strerror.startswith(f"cannot write {out / 'last.pt'}: no space left on the device")
    assert (out / "last.pt").read_bytes() == b"previous" and not list(out.glob("*.tmp"))


def test_rule8_read_only_output_found_before_training(world, tmp_path, capsys, small_mount, monkeypatch):
    ro = small_mount("1m", ro=True)
    if ro is None:
        import errno

        ro = tmp_path / "ro"
        ro.mkdir()
        real_mkstemp = __import__("tempfile").mkstemp
        monkeypatch.setattr(
            "tempfile.mkstemp",
            lambda *a, **k: (
                (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system"))
                if str(ro) in str(k.get("dir", ""))
                else real_mkstemp(*a, **k)
            ),
        )
    for argv in (
        [*TRAIN, "--prepared-dir", world / "prepared", "--out", ro / "run"],
        [
            "evaluate",
            "--checkpoint",
            world / "run" / "last.pt",
            "--prepared-dir",
            world / "prepared",
            "--out",
            ro / "eval",
        ],
    ):
        rc, out, err = cli(argv, capsys)
        assert rc == 2 and "is not writable" in err and str(ro) in err, err
        assert "epoch" not in out and "MAP" not in out  # found before any work


# ============================================================================ rule 9: leftovers cleaned
def test_rule9_kill9_during_checkpoint_write_leaves_a_tmp_the_next_run_removes(world, tmp_path, capsys):
    run = fresh_run(world, tmp_path)
    code = (
        "import os, signal, torch\nfrom scanet.io import atomic_write\n"
        "def write(fh):\n    fh.write(b'x' * 300000); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_write({str(run / 'last.pt')!r}, write)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert p.returncode == -signal.SIGKILL
    left = list(run.glob("last.pt.*.tmp"))
    assert len(left) == 1 and left[0].stat().st_size == 300000
    (run / "metrics.json.abcd1234.tmp").write_bytes(b"old-style name, no pid")
    before = sha256_file(run / "last.pt")
    rc, out, _ = cli([*TRAIN, "--prepared-dir", world / "prepared", "--out", run, "--resume"], capsys)
    assert rc == 0 and f"removed {left[0]}" in out
    assert not list(run.glob("*.tmp")) and sha256_file(run / "last.pt") == before  # the old checkpoint intact


def test_rule9_a_live_writers_temporary_file_is_left_alone(tmp_path):
    from scanet.io import remove_leftovers

    live = tmp_path / f"last.pt.{os.getppid()}.abcdefgh.tmp"
    dead = tmp_path / f"last.pt.{dead_pid()}.abcdefgh.tmp"
    folder = tmp_path / f"synthetic.tmp-{dead_pid()}-xyz"
    for f in (live, dead):
        f.write_bytes(b"x")
    folder.mkdir()
    assert sorted(remove_leftovers(tmp_path)) == sorted([dead, folder])
    assert live.exists()
