"""The package's structure, checked: the import graph (no circle, nothing below the command line imports it,
fused/ and kernels/ never import the model), file sizes, ``import scanet.fused`` without triton, ``python -m
scanet``, ``prepare --help`` listing every dataset, and type-checked ``--set``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from scanet.config import apply_overrides, get_preset

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "scanet"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _library_files():
    files = [p for p in PKG.rglob("*.py") if "kernels" not in p.relative_to(PKG).parts[:1]]
    return files + sorted((REPO / "kernels").glob("*.py"))


def import_graph() -> dict[str, set[str]]:
    """module -> the scanet modules it imports, at module level or inside functions (kernels/ as scanet.kernels)."""
    graph = {}
    for path in _library_files():
        name = (
            _module_name(path).replace("kernels.", "scanet.kernels.", 1)
            if path.parent.name == "kernels" and path.parent.parent == REPO
            else _module_name(path)
        )
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            deps.update(m for m in mods if m.split(".")[0] == "scanet")
        graph[name] = deps
    known = set(graph)
    return {m: {d for d in deps if d in known and d != m} for m, deps in graph.items()}


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(d) :] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_arrows_point_down():
    graph = import_graph()
    for m, deps in graph.items():
        if not m.startswith("scanet.cli") and m != "scanet.__main__":  # the entry point is the top
            assert not {d for d in deps if d.startswith("scanet.cli")}, f"{m} imports the command line"
        if m.startswith(("scanet.fused", "scanet.kernels", "scanet.layers", "scanet.reference", "scanet.laplacian")):
            assert "scanet.model" not in deps, f"{m} imports scanet.model"
        if m.startswith("scanet.data"):
            assert not {d for d in deps if d.split(".")[1] in ("model", "train", "retrieve", "index", "fused")}, m


def test_library_files_are_short_or_say_why():
    for path in _library_files():
        if path.parent.name == "kernels":
            continue  # owned by the kernel files' own layout (launcher + kernel + Function)
        n = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        assert n <= 400 or "lines" in doc, f"{path.relative_to(REPO)} has {n} lines and no reason at its top"


def test_import_fused_without_triton(tmp_path):
    """The native CPU path needs no triton: scanet.fused imports the kernels only when they run."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, scanet.fused as f\n"
        "from scanet.model import SCANet\n"
        "assert 'scanet.kernels.cheb' not in sys.modules and 'scanet.kernels.coattention' not in sys.modules\n"
        "print('ok', f.PRECISIONS)\n"
    )
    env = {"PYTHONPATH": str(REPO), "TRITON_INTERPRET": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ok ('fp32', 'tf32', 'bf16', 'fp16')" in out.stdout


def test_precision_vocabulary_agrees_with_the_kernels():
    from scanet.fused import PRECISIONS
    from scanet.kernels import coattention, pair_scores

    assert PRECISIONS == coattention.PRECISIONS
    assert set(PRECISIONS) <= set(getattr(pair_scores, "PRECISIONS", PRECISIONS))


def test_python_dash_m_scanet_and_prepare_help(tmp_path):
    from scanet.data import PREPARERS

    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "scanet", "prepare", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    for name in PREPARERS:
        assert f"\n  {name} " in out.stdout or f"\n  {name}\n" in out.stdout, (name, out.stdout)


@pytest.mark.parametrize(
    "override,match",
    [
        ("epochs=2.5", "epochs=2.5: epochs must be an int >= 1"),
        ("decoupled_weight_decay=1", "decoupled_weight_decay=1: decoupled_weight_decay must be True or False"),
        ("lr=fast", "lr='fast': lr must be a finite float > 0"),
        ("gcn_channels=3", "gcn_channels=3: gcn_channels must be a non-empty tuple of ints >= 1"),
        ("model.common_dim=[1]", r"model.common_dim=\[1\]: model.common_dim must be an int >= 1"),
    ],
)
def test_set_is_type_checked(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(get_preset("synthetic"), [override])


def test_set_accepts_the_field_types():
    p = apply_overrides(
        get_preset("synthetic"),
        ["lr=1", "gcn_channels=[2,1]", "attention_scale=1", "decoupled_weight_decay=False", "epochs=3"],
    )
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float) and p.model.gcn_channels == (2, 1)
    assert p.model.attention_scale == "1" and p.train.decoupled_weight_decay is False and p.train.epochs == 3
    assert apply_overrides(get_preset("custom"), ["vocab_size=500"]).vocab_size == 500
    # booleans as a shell user types them (a run once failed on ground_truth_pairs=true); 1 / yes stay errors
    p = apply_overrides(get_preset("wiki"), ["ground_truth_pairs=true", "decoupled_weight_decay=FALSE"])
    assert p.train.ground_truth_pairs is True and p.train.decoupled_weight_decay is False
    with pytest.raises(ValueError, match="must be True or False"):
        apply_overrides(get_preset("wiki"), ["ground_truth_pairs=yes"])


def test_option_values_are_read_as_set_values():
    # one reader for --set and --option: a preparer's bool option given as false is False, not the truthy "false"
    from scanet.cli._common import parse_options

    opts = parse_options(["single_object=false", "exactly_one=TRUE", "knn=3", "graph=paper", "tags=(1, 2)", "x=yes"])
    assert opts == {"single_object": False, "exactly_one": True, "knn": 3, "graph": "paper", "tags": (1, 2), "x": "yes"}
