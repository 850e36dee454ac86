"""scanet.train under torchrun: 2 gloo ranks equal one process of the same global batch; resume is exact.

The first test runs the real command, ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m scanet
train`` (127.0.0.1, offline), against ``python -m scanet train`` with the same settings. The second spawns two
workers with the variables torchrun sets (as tests/test_distributed.py does) and calls train() itself.
"""

import dataclasses
import os
import socket
import subprocess
import sys
import time

import torch
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
# tiny: 400 pairs, 7 global batches of 64 (the last one 16); no dropout (the one stream ranks cannot share)
SETTINGS = [
    "--set",
    "epochs=1",
    "--set",
    "dropout=0",
    "--set",
    "eval_every=0",
    "--set",
    "validation_fraction=0",
    "--set",
    "positive_pairs=200",
    "--set",
    "negative_pairs=200",
]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(cmd, cwd):
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return time.perf_counter() - t0


def _params(path):
    return torch.load(path, weights_only=True)["model"]


def _initial_params(data_dir):
    """The parameters train() starts from (seeded with the preset's seed before build_model)."""
    from scanet.checkpoint import build_model
    from scanet.config import apply_overrides, get_preset
    from scanet.data.prepared import PreparedDataset

    preset = apply_overrides(get_preset("synthetic"), SETTINGS[1::2])
    torch.manual_seed(preset.train.seed)
    return build_model(preset, PreparedDataset.load(data_dir)).state_dict()


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    base = [
        sys.executable,
        "-m",
        "scanet",
        "train",
        "--preset",
        "synthetic",
        "--eager",
        "--no-baseline",
        "--prepared-dir",
        str(tmp_path / "prepared"),
        *SETTINGS,
    ]
    _run([*base, "--out", str(tmp_path / "one")], tmp_path)  # also prepares the data once
    wall = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={WORLD}",
            *base[1:],
            "--out",
            str(tmp_path / "two"),
        ],
        tmp_path,
    )
    print(f"torchrun 2 ranks, 1 epoch: {wall:.1f} s wall")
    one, two = _params(tmp_path / "one" / "last.pt"), _params(tmp_path / "two" / "last.pt")
    assert one.keys() == two.keys()
    start = _initial_params(tmp_path / "prepared" / "synthetic")
    moved = 0
    for k, v in one.items():
        if v.is_floating_point():
            torch.testing.assert_close(two[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
            moved += not torch.allclose(v, start[k], rtol=1e-3, atol=1e-5)
    assert moved >= 4, "the epoch must move the parameters for the comparison to mean much"
    # rank 0 alone wrote the run's files, once: one metrics row, and results.json of the one evaluation
    import json

    rows = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1]
    ref = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert abs(rows[0]["loss"] - ref[0]["loss"]) <= 1e-5 * abs(ref[0]["loss"])  # the all-reduced (global) loss


# ------------------------------------------------------------------------------------- resume under torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resume_preset():
    """Synthetic, 2 epochs, dropout on (each rank's stream must also resume exactly), a validation split."""
    from scanet.config import get_preset

    p = get_preset("synthetic")
    return dataclasses.replace(
        p,
        train=dataclasses.replace(
            p.train, epochs=2, positive_pairs=150, negative_pairs=150, eval_every=0, validation_fraction=0.1
        ),
    )


def _resume_worker(rank: int, port: int, data_dir: str, out_dir: str):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from scanet import distributed as sd
    from scanet.data.prepared import PreparedDataset
    from scanet.train import train

    ds, preset = PreparedDataset.load(data_dir), _resume_preset()
    quiet = dict(progress=False, log=lambda *a: None)
    first = train(preset, ds, os.path.join(out_dir, "resumed"), stop_after_epoch=1, **quiet)
    resumed = train(preset, ds, os.path.join(out_dir, "resumed"), resume=True, **quiet)
    straight = train(preset, ds, os.path.join(out_dir, "straight"), **quiet)
    torch.save(
        {"first": len(first["history"]), "resumed": resumed["history"], "straight": straight["history"]},
        os.path.join(out_dir, f"histories{rank}.pt"),
    )
    sd.destroy()


def test_torchrun_resume_is_exact(tmp_path):
    from scanet.data import synthetic

    data_dir = str(tmp_path / "synthetic")
    synthetic.prepare(data_dir, progress=lambda *a: None)
    mp.spawn(_resume_worker, args=(_free_port(), data_dir, str(tmp_path)), nprocs=WORLD, join=True)
    resumed, straight = tmp_path / "resumed" / "last.pt", tmp_path / "straight" / "last.pt"
    a, b = torch.load(resumed, weights_only=True), torch.load(straight, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][n], sb[i][n]) for i in sb for n in sb[i])
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    h = [torch.load(tmp_path / f"histories{r}.pt", weights_only=True) for r in range(WORLD)]
    assert h[0]["first"] == h[1]["first"] == 1
    for key in ("resumed", "straight"):  # rank 1 followed rank 0's rows (the broadcast)
        assert [r["epoch"] for r in h[1][key]] == [1, 2]
        assert [r.get("val_mean_map") for r in h[1][key]] == [r.get("val_mean_map") for r in h[0][key]]
