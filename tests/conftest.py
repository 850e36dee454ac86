"""Shared test set-up.

Triton kernels run on CPU only under the interpreter, and TRITON_INTERPRET must be set before any kernel
module is imported: this conftest is imported first, so it sets it here when there is no CUDA device.
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests use small tensors, where torch's OpenMP threads cost more than they give (and spin-wait badly on
# a loaded 2-core machine). Tests that need more threads set them explicitly.
torch.set_num_threads(1)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SCANET_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def wiki_root() -> Path:
    root = SHARED_DATA / "wiki"
    if not (root / "trainset_txt_img_cat.list").exists():
        pytest.skip(f"real Eng-Wiki data not found at {root} (set SCANET_SHARED_DATA)")
    return root


def devices():
    """Devices a kernel test runs on: CPU (interpreted Triton) always, CUDA when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory):
    """The default synthetic dataset, prepared once per test module."""
    from scanet.data import synthetic

    return synthetic.prepare(tmp_path_factory.mktemp("prep") / "synthetic", progress=lambda s: None)
