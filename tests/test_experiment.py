"""scanet.experiment: the Table 3 / Table 4 grids on a tiny synthetic dataset (every cell listed, resume gives the
same table without retraining finished cells, another configuration refused, clear CLI errors)."""

from __future__ import annotations  # the config fields' types as text, as scanet.config reads them

import dataclasses
import json

import pytest

import scanet.experiment as experiment
from scanet.checkpoint import load_checkpoint
from scanet.cli import main
from scanet.config import ModelConfig, _f, get_preset
from scanet.data import synthetic
from scanet.experiment import GRIDS, grid_cells, load_state, run_grid
from scanet.experiment_report import markdown, protocol_tables

SET = ["epochs=2", "positive_pairs=150", "negative_pairs=150", "common_dim=8", "batch_size=50"]
REAL_TRAIN = experiment.train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A prepared synthetic dataset small enough for a grid cell to take about a second."""
    folder = tmp_path_factory.mktemp("tiny") / "synthetic"
    synthetic.prepare(folder, progress=lambda s: None, n_train=96, n_test=48, vocab_size=40, image_dim=8, text_len=20)
    return folder


@pytest.fixture(scope="module")
def dataset(tiny):
    from scanet.data.prepared import PreparedDataset

    return PreparedDataset.load(tiny)


def _run(dataset, out, cells, overrides=SET, **kw):
    return run_grid(
        kw.pop("table", "table4"),
        get_preset("synthetic"),
        dataset,
        out,
        overrides=list(overrides),
        cells=cells,
        progress=False,
        log=kw.pop("log", lambda s: None),
        **kw,
    )


@pytest.fixture(scope="module")
def table4_m06(dataset, tmp_path_factory):
    """The four m = 0.6 cells of Table 4, run without interruption."""
    out = tmp_path_factory.mktemp("grid") / "table4"
    return out, _run(dataset, out, "m0.6")


def test_table4_lists_every_cell_and_writes_md_json_png(table4_m06):
    out, state = table4_m06
    names = [c.name for c in grid_cells(GRIDS["table4"])]
    assert len(names) == 20 and state["order"] == names
    saved = json.loads((out / "table4.json").read_text())
    assert saved["order"] == names and set(saved["cells"]) == set(names)
    done = {n for n, c in saved["cells"].items() if c["status"] == "done"}
    assert done == {"m0.6_lam0.25", "m0.6_lam0.30", "m0.6_lam0.35", "m0.6_lam0.40"}
    assert {c["status"] for n, c in saved["cells"].items() if n not in done} == {"pending"}
    for n in done:
        cell = saved["cells"][n]
        assert set(cell["protocols"]) == {"standard", "paper"}
        for p in cell["protocols"].values():
            assert 0 < p["text2image"] <= 1 and 0 < p["image2text"] <= 1
            assert p["mean"] == pytest.approx((p["text2image"] + p["image2text"]) / 2)
        assert 1 <= cell["selected_epoch"] <= cell["epochs_run"] == 2 and cell["wall_seconds"] > 0
        assert cell["overrides"] == SET + [f"margin={cell['settings']['margin']}", f"lam={cell['settings']['lam']}"]
        # the cell is a normal run folder trained with the cell's settings, its report the selected epoch's
        ckpt = load_checkpoint(out / "cells" / n / "last.pt")
        assert ckpt["preset"]["train"]["margin"] == cell["settings"]["margin"] == 0.6
        assert ckpt["preset"]["train"]["lam"] == cell["settings"]["lam"]
        assert ckpt["preset"]["model"]["common_dim"] == 8
        ev = json.loads((out / "cells" / n / "evaluation.json").read_text())
        assert ev["selected_epoch"] == cell["selected_epoch"]
        assert ev["protocols"]["paper"]["mean"] == cell["protocols"]["paper"]["mean"]
    assert saved["config"]["overrides"] == SET and saved["wall_seconds"] > 0
    assert saved["runs"][0]["machine"] and saved["runs"][0]["started"]
    md = (out / "table4.md").read_text()
    assert md.count("| 0.6 | 0.35 |") == 2  # a row per protocol
    assert "MAP@all" in md and "MAP@100" in md and "n/a (not available offline)" in md
    for n in done:
        assert f"{saved['cells'][n]['protocols']['standard']['mean']:.4f}" in md
    assert (out / "table4.png").stat().st_size > 5000


def test_table3_runs_gcn_rows_and_lists_the_rest_with_reasons(dataset, tmp_path):
    out = tmp_path / "t3"
    state = _run(
        dataset,
        out,
        "gcn_fixed_L",
        overrides=SET[:1] + ["positive_pairs=60", "negative_pairs=60"] + SET[3:],
        table="table3",
    )
    cells = state["cells"]
    assert len(cells) == 48
    for layers in range(4):
        c = cells[f"gcn_fixed_L{layers}"]
        assert c["status"] == "done", c
        ckpt = load_checkpoint(out / "cells" / f"gcn_fixed_L{layers}" / "last.pt")
        assert ckpt["preset"]["model"]["coattention_layers"] == layers
    assert all(c["status"] == "open" and "weights" in c["reason"] for n, c in cells.items() if "vgg19" in n)
    assert all(c["status"] == "open" for n, c in cells.items() if "resnet50" in n)
    for n, c in cells.items():  # CNN-5: not run (the synthetic data has no pixels); LSTM / CNN: outside --cells
        if "vgg19" in n or "resnet50" in n or n.startswith("gcn_fixed"):
            continue
        if "cnn5" in n:
            assert c["status"] == "not run" and "needs raw image pixels" in c["reason"], (n, c)
        else:
            assert c["status"] == "pending" and "--cells" in c["reason"], (n, c)
    md = (out / "table3.md").read_text()
    assert "| GCN | fixed features | 2 |" in md and "open [" in md and "not run [" in md
    assert (out / "table3.png").stat().st_size > 5000


def test_interrupted_grid_resumes_to_the_same_table_without_retraining(dataset, table4_m06, tmp_path, monkeypatch):
    full_out, full = table4_m06
    out = tmp_path / "cut"
    calls = []

    def killed_in_the_third_cell(preset, ds, cell_dir, **kw):
        calls.append(cell_dir.name)
        if len(calls) == 3:  # one epoch done, then the process "dies"
            REAL_TRAIN(preset, ds, cell_dir, **{**kw, "stop_after_epoch": 1})
            raise RuntimeError("injected interruption")
        return REAL_TRAIN(preset, ds, cell_dir, **kw)

    monkeypatch.setattr(experiment, "train", killed_in_the_third_cell)
    with pytest.raises(RuntimeError, match="injected"):
        _run(dataset, out, "m0.6")
    saved = load_state(out / "table4.json")
    status = {n: saved["cells"][n]["status"] for n in full["order"] if n.startswith("m0.6")}
    assert status == {
        "m0.6_lam0.25": "done",
        "m0.6_lam0.30": "done",
        "m0.6_lam0.35": "partial",
        "m0.6_lam0.40": "pending",
    }
    first_two = {n: (out / "cells" / n / "last.pt").stat().st_mtime_ns for n in ("m0.6_lam0.25", "m0.6_lam0.30")}

    calls.clear()
    messages = []

    def counted(preset, ds, cell_dir, **kw):
        calls.append(cell_dir.name)
        return REAL_TRAIN(preset, ds, cell_dir, **kw)

    monkeypatch.setattr(experiment, "train", counted)
    resumed = _run(dataset, out, "m0.6", log=messages.append)
    assert calls == ["m0.6_lam0.35", "m0.6_lam0.40"]  # finished cells are not trained again
    assert any("resuming from" in m and "m0.6_lam0.35" in m for m in messages)
    assert {n: (out / "cells" / n / "last.pt").stat().st_mtime_ns for n in first_two} == first_two
    assert protocol_tables(resumed) == protocol_tables(full)
    for n in full["order"]:
        a, b = full["cells"][n], resumed["cells"][n]
        assert (a["status"], a.get("selected_epoch"), a.get("protocols")) == (
            b["status"],
            b.get("selected_epoch"),
            b.get("protocols"),
        )
    assert len(resumed["runs"]) == 2 and resumed["wall_seconds"] >= resumed["runs"][0]["wall_seconds"]

    calls.clear()  # a third run with everything done trains nothing
    _run(dataset, out, "m0.6")
    assert calls == []


def test_stop_after_cells_and_a_failing_cell(dataset, tmp_path, monkeypatch):
    out = tmp_path / "g"
    state = _run(dataset, out, "lam0.25", stop_after_cells=0)
    assert all(c["status"] == "pending" for c in state["cells"].values())
    assert (out / "table4.md").is_file()

    def refuses(preset, ds, cell_dir, **kw):
        raise ValueError(f"cell {cell_dir.name} cannot be trained")

    monkeypatch.setattr(experiment, "train", refuses)
    state = _run(dataset, out, "m0.4_lam0.25")
    cell = state["cells"]["m0.4_lam0.25"]
    assert cell["status"] == "failed" and "cannot be trained" in cell["reason"]
    assert "failed [" in (out / "table4.md").read_text()


OlderModel = dataclasses.make_dataclass(
    "OlderModel",
    [
        (f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(ModelConfig)
        if f.name not in ("text_encoder", "image_encoder")
    ],
)


@dataclasses.dataclass
class NarrowModel(ModelConfig):
    text_encoder: str = _f("gcn", choices=("gcn",))
    image_encoder: str = _f("fixed", choices=("fixed",))


def test_which_cells_can_run_follows_the_config_keys_and_the_dataset_inputs(dataset):
    from scanet.experiment import base_preset, cell_blocker, cell_overrides

    cells = {c.name: c for c in grid_cells(GRIDS["table3"])}
    p = get_preset("synthetic")
    # A configuration without the encoder keys (as before branch wire): only GCN + fixed features can run.
    older = base_preset(GRIDS["table3"], dataclasses.replace(p, model=OlderModel()), SET)
    assert cell_blocker(cells["gcn_fixed_L2"], older, dataset) is None  # GCN + fixed features: the keys left out
    assert cell_overrides(cells["gcn_fixed_L2"], older) == ["coattention_layers=2"]
    assert cell_blocker(cells["lstm_fixed_L2"], older, dataset) == (
        "not run",
        "the configuration has no key 'text_encoder' yet (scanet.config)",
    )
    wired = base_preset(GRIDS["table3"], p, SET)  # today's configuration has the keys
    assert cell_overrides(cells["gcn_fixed_L2"], wired) == [
        "text_encoder=gcn",
        "image_encoder=fixed",
        "coattention_layers=2",
    ]
    assert cell_blocker(cells["gcn_fixed_L2"], wired, dataset) is None
    assert cell_blocker(cells["gcn_cnn5_L2"], wired, dataset) == (
        "not run",
        "image_encoder=cnn5 needs raw image pixels; the prepared dataset 'synthetic' has none",
    )
    assert cell_blocker(cells["lstm_fixed_L0"], wired, dataset) is None  # the synthetic data has token sequences
    no_tokens = dataclasses.replace(dataset, train=dataclasses.replace(dataset.train))
    no_tokens.train.tokens = None
    assert "needs token-id sequences" in cell_blocker(cells["lstm_fixed_L0"], wired, no_tokens)[1]
    assert cell_blocker(cells["cnn_vgg19_L2"], wired, dataset)[0] == "open"
    with_inputs = dataclasses.replace(dataset, train=dataclasses.replace(dataset.train))
    with_inputs.train.pixels = object()  # type: ignore[attr-defined]
    with_inputs.train.tokens = object()  # type: ignore[attr-defined]
    assert cell_blocker(cells["lstm_cnn5_L3"], wired, with_inputs) is None
    narrow = dataclasses.replace(wired, model=NarrowModel(**dataclasses.asdict(p.model)))
    status, reason = cell_blocker(cells["gcn_cnn5_L1"], narrow, with_inputs)
    assert status == "not run" and "image_encoder='cnn5': image_encoder must be one of 'fixed'" in reason


def test_another_configuration_is_refused(dataset, table4_m06):
    out, _ = table4_m06
    with pytest.raises(ValueError, match=r"another configuration: train.positive_pairs \(saved 150, given 100\)"):
        _run(dataset, out, "m0.6", overrides=SET[:1] + ["positive_pairs=100"] + SET[2:])
    with pytest.raises(ValueError, match=r"train.epochs \(saved 2, given 3\)"):
        _run(dataset, out, "m0.6", overrides=SET[1:], epochs=3)
    with pytest.raises(ValueError, match="table4 sets this key per cell"):
        _run(dataset, out, "m0.6", overrides=SET + ["margin=0.5"])
    with pytest.raises(ValueError, match="matches no cell of table4; its cells: m0.4_lam0.25"):
        _run(dataset, out, "nope")
    run = out.parent / "a_training_run"
    run.mkdir()
    (run / "metrics.json").write_text("[]")
    with pytest.raises(ValueError, match="holds a training run .metrics.json.; a grid needs a folder of its own"):
        _run(dataset, run, "m0.6")
    before = (out / "table4.json").read_text()
    assert load_state(out / "table4.json")["config"]["overrides"] == SET and before  # the state is untouched


def test_cli_runs_a_cell_and_its_errors_are_clear(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["experiment", "table4", "--preset", "synthetic", "--data", str(tiny), "--out", str(out)]
    set_args = [a for s in SET[1:] for a in ("--set", s)]
    assert main(args + ["--epochs", "1", "--cells", "m0.8_lam0.40"] + set_args) == 0
    state = load_state(out / "table4.json")
    assert state["cells"]["m0.8_lam0.40"]["status"] == "done"
    assert state["runs"][0]["command"].startswith("scanet experiment table4 --preset synthetic --data ")
    assert "--epochs 1" in state["runs"][0]["command"]
    capsys.readouterr()
    assert main(args + ["--epochs", "2", "--cells", "m0.8"] + set_args) == 2
    assert "another configuration: train.epochs (saved 1, given 2)" in capsys.readouterr().err
    assert main(args + ["--set", "lam=0.3"]) == 2
    assert "--set lam: table4 sets this key per cell" in capsys.readouterr().err
    assert main(args + ["--epochs", "1", "--set", "epochs=2"]) == 2
    assert "epochs given twice" in capsys.readouterr().err
    assert main(args + ["--cells", "zzz"]) == 2
    assert "--cells 'zzz' matches no cell" in capsys.readouterr().err
    assert main(["experiment", "table4", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["experiment", "table4", "--preset", "wiki", "--out", str(tmp_path / "w")]) == 2
    assert "needs --root" in capsys.readouterr().err
    for bad, message in (
        (["experiment", "table5", "--preset", "synthetic"], "invalid choice: 'table5'"),
        (["experiment", "table4", "--preset", "synthetic", "--epochs", "0"], "epochs must be an int >= 1"),
        (["experiment", "table4"], "the following arguments are required: --preset"),
    ):
        with pytest.raises(SystemExit):
            main(bad)
        assert message in capsys.readouterr().err


def test_paper_values_sit_beside_the_matching_cell(table4_m06):
    assert experiment.PAPER_VALUES["table4"]["wiki"] == {"m0.6_lam0.35": (0.81, 0.46)}
    assert experiment.PAPER_VALUES["table3"]["wiki"] == {"gcn_vgg19_L2": (0.81, 0.46)}
    names = {c.name for t in GRIDS.values() for c in grid_cells(t)}
    assert all(cell in names for t in experiment.PAPER_VALUES.values() for d in t.values() for cell in d)
    _, state = table4_m06
    assert state["paper_values"] == {}  # no paper value for the synthetic dataset
    md = markdown({**state, "paper_values": {"m0.6_lam0.35": [0.81, 0.46]}})
    rows = [line for line in md.splitlines() if line.startswith("| 0.6 | 0.35 |")]
    assert len(rows) == 2 and all(r.endswith("| 0.810 / 0.460 / 0.635 |") for r in rows)
    assert sum("0.810 / 0.460" in line for line in md.splitlines()) == 2
    assert "probably the authors' group's protocol" in md
