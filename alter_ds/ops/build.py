"""Build and load the grouped adapter extension (``csrc/``): JIT with ninja on first use, cached on disk.

Two libraries: the CPU one (``csrc/grouped_adapter.cpp``: the op schemas and CPU kernels), built the first
time a CPU tensor needs the op, and the CUDA one (``csrc/cuda/``), built when CUDA tensors ask for its kernels
and torch, a GPU and nvcc are there. Both go to ``$ALTER_DS_EXTENSIONS_DIR`` (default
``~/.cache/alter-ds/extensions/torch<version>-py<version>-<cpu|cuXY>``); later processes reuse the build, and
ranks starting at once share one build through torch's file lock. If there is no compiler, no ninja or a build
fails, it warns once and the op keeps using the PyTorch reference. Build ahead of time (a container image, a
cluster's login node) with ``python -m alter_ds.ops.build`` or ``alter-ds build-ext``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from alter_ds.errors import AlterDsError

CSRC = Path(__file__).resolve().parents[1] / "_csrc"  # a link to the repository's csrc/, packaged in wheels
CPP_SOURCES = [CSRC / "grouped_adapter.cpp"]
CUDA_SOURCES = [CSRC / "cuda" / "grouped_adapter.cu"]
EXTENSIONS_DIR_ENV = "ALTER_DS_EXTENSIONS_DIR"

# Whether ``auto`` sends CUDA tensors to the CUDA kernels. They compile for sm_80/sm_90 in CI and pass their
# tests in the CPU device emulation (tests/test_cuda_kernels_emulated.py), but have not yet run the GPU tests
# (tests/test_grouped_adapter_kernels.py -m gpu) or the benchmark on a GPU, so nothing shows yet that they are
# right on the hardware and faster than the reference there; until then CUDA tensors use the PyTorch reference
# unless ALTER_DS_GROUPED_ADAPTER=cuda asks for the kernels explicitly.
CUDA_KERNELS_VERIFIED = False

_loaded: dict[str, bool] = {}  # "cpu" / "cuda" -> built and loaded in this process (absent: not tried yet)


class ExtensionBuildError(AlterDsError, RuntimeError):
    """The extension could not be compiled or loaded; the message says why and what to do."""


def cuda_buildable() -> bool:
    """This torch has CUDA, a GPU is visible, and nvcc can be found."""
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(torch.version.cuda) and torch.cuda.is_available() and CUDA_HOME is not None


def build_directory(flavour: str) -> Path:
    root = os.environ.get(EXTENSIONS_DIR_ENV) or Path.home() / ".cache" / "alter-ds" / "extensions"
    if flavour == "cuda":
        flavour = f"cu{torch.version.cuda}"
    version = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"{version}-{flavour}"


def _cuda_include_paths() -> list[str]:
    """pip's CUDA wheels keep headers (cusparse.h, ...) where nvcc does not look by default."""
    found: list[str] = []
    for entry in sys.path:
        if entry and Path(entry).is_dir():
            found.extend(str(candidate) for candidate in Path(entry).glob("nvidia/cu*/include"))
    return found


def compile_extension(flavour: str, directory: Path, verbose: bool = False) -> None:
    """Compile (or reuse) the CPU library (op schemas + CPU kernels) or the CUDA library (CUDA kernels) in
    ``directory`` and load it into this process's ``torch.ops``. Two libraries, so a CUDA toolchain problem
    never costs the CPU kernels."""
    from torch.utils.cpp_extension import load

    sources = CPP_SOURCES if flavour == "cpu" else CUDA_SOURCES
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise ExtensionBuildError(f"sources not found: {', '.join(missing)}")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        load(
            name="alter_ds_grouped_adapter" + ("" if flavour == "cpu" else "_cuda"),
            sources=[str(p) for p in sources],
            extra_cflags=["-O3"],  # torch picks the C++ standard its headers need (C++20 from torch 2.14)
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"] if flavour == "cuda" else None,
            extra_include_paths=[str(CSRC)] + (_cuda_include_paths() if flavour == "cuda" else []),
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as error:  # compiler missing, ninja missing, compile error: all mean "no extension"
        detail = str(error).strip().splitlines()
        raise ExtensionBuildError(
            f"{type(error).__name__}: {detail[-1] if detail else ''} (build log: {directory})"
        ) from error


def _load(flavour: str, verbose: bool) -> bool:
    if flavour in _loaded:
        return _loaded[flavour]
    try:
        compile_extension(flavour, build_directory(flavour), verbose)
    except ExtensionBuildError as error:
        what = "grouped adapter extension" if flavour == "cpu" else "grouped adapter extension's CUDA kernels"
        warnings.warn(
            f"alter-ds: the {what} could not be built, so the PyTorch reference runs instead "
            f"(same results, slower). {error}. Set ALTER_DS_GROUPED_ADAPTER=reference to skip the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        _loaded[flavour] = False
        return False
    from alter_ds.ops import kernels

    kernels.register_python_parts()
    _loaded[flavour] = True
    return True


def load_extension(verbose: bool = False) -> bool:
    """Build or load the CPU library once per process; True when ``torch.ops.alter_ds`` holds its kernels.

    Failure is not an error: it warns once, naming the reason, and the op uses the PyTorch reference.
    """
    return _load("cpu", verbose)


def load_cuda_extension(verbose: bool = False) -> bool:
    """The CPU library, then the CUDA kernels for the same ops when CUDA can be built; warns once on failure."""
    if not load_extension(verbose) or not cuda_buildable():
        return False
    return _load("cuda", verbose)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the grouped adapter extension ahead of time.")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    parser.add_argument(
        "--compile-check-cuda",
        action="store_true",
        help="compile the CUDA kernels into a temporary directory even without a GPU (TORCH_CUDA_ARCH_LIST "
        "chooses the architectures); exit 0 when they compile",
    )
    args = parser.parse_args(argv)
    if args.compile_check_cuda:
        if not torch.version.cuda:
            print("build: this torch has no CUDA; install a CUDA build of torch for the compile check", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory(prefix="alter-ds-cuda-check-") as scratch:
            try:
                compile_extension("cpu", Path(scratch) / "cpu", args.verbose)
                compile_extension("cuda", Path(scratch) / "cuda", args.verbose)
            except ExtensionBuildError as error:
                if "NVIDIA driver" not in str(error) and "no CUDA GPUs" not in str(error):
                    print(f"build: CUDA compile check failed: {error}", file=sys.stderr)
                    return 1
        print(f"build: csrc/ compiles for CUDA {torch.version.cuda}, arch {os.environ.get('TORCH_CUDA_ARCH_LIST')}")
        return 0
    built = []
    for flavour in ["cpu", "cuda"] if cuda_buildable() else ["cpu"]:
        directory = build_directory(flavour)
        try:
            compile_extension(flavour, directory, args.verbose)
        except ExtensionBuildError as error:
            print(f"build: {error}", file=sys.stderr)
            return 1
        built.append(f"{flavour} in {directory}")
    print(f"build: grouped adapter extension ready: {'; '.join(built)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
