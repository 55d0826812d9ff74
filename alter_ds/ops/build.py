"""Build and load the grouped adapter extension (``csrc/``): JIT with ninja on first use, cached on disk.

The first call of :func:`load_extension` in a process compiles ``csrc/grouped_adapter.cpp`` (and, when CUDA
is usable, ``csrc/cuda/grouped_adapter.cu``) into ``$ALTER_DS_EXTENSIONS_DIR`` (default
``~/.cache/alter-ds/extensions/<torch version>``); later processes reuse the build, and ranks starting at
once share one build through torch's file lock. If there is no compiler, no ninja or the build fails, it warns
once and the op keeps using the PyTorch reference. Build ahead of time (a container image, a cluster's login
node) with ``python -m alter_ds.ops.build`` or ``alter-ds build-ext``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[1] / "_csrc"  # a link to the repository's csrc/, packaged in wheels
CPP_SOURCES = [CSRC / "grouped_adapter.cpp"]
CUDA_SOURCES = [CSRC / "cuda" / "grouped_adapter.cu"]
EXTENSIONS_DIR_ENV = "ALTER_DS_EXTENSIONS_DIR"

_loaded: bool | None = None  # None: not tried in this process yet


class ExtensionBuildError(RuntimeError):
    """The extension could not be compiled or loaded; the message says why and what to do."""


def cuda_wanted() -> bool:
    """Build the CUDA kernels when this torch has CUDA, a GPU is visible, and nvcc can be found."""
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(torch.version.cuda) and torch.cuda.is_available() and CUDA_HOME is not None


def build_directory(with_cuda: bool) -> Path:
    root = os.environ.get(EXTENSIONS_DIR_ENV) or Path.home() / ".cache" / "alter-ds" / "extensions"
    flavour = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    return (
        Path(root)
        / f"torch{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}-{flavour}"
    )


def _cuda_include_paths() -> list[str]:
    """pip's CUDA wheels keep headers (cusparse.h, ...) where nvcc does not look by default."""
    found = []
    for entry in sys.path:
        for candidate in Path(entry).glob("nvidia/cu*/include") if entry and Path(entry).is_dir() else []:
            found.append(str(candidate))
    return found


def compile_extension(with_cuda: bool, directory: Path, verbose: bool = False) -> None:
    """Compile (or reuse) the extension in ``directory`` and load it into this process's ``torch.ops``."""
    from torch.utils.cpp_extension import load

    missing = [str(p) for p in CPP_SOURCES + (CUDA_SOURCES if with_cuda else []) if not p.is_file()]
    if missing:
        raise ExtensionBuildError(f"sources not found: {', '.join(missing)} (an installed wheel without csrc/?)")
    directory.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-std=c++17"]
    try:
        load(
            name="alter_ds_grouped_adapter" + ("_cuda" if with_cuda else ""),
            sources=[str(p) for p in CPP_SOURCES + (CUDA_SOURCES if with_cuda else [])],
            extra_cflags=flags,
            extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr"] if with_cuda else None,
            extra_include_paths=[str(CSRC)] + (_cuda_include_paths() if with_cuda else []),
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as error:  # compiler missing, ninja missing, compile error: all mean "no extension"
        detail = str(error).strip().splitlines()
        raise ExtensionBuildError(
            f"{type(error).__name__}: {detail[-1] if detail else ''} (build log: {directory})"
        ) from error


def load_extension(verbose: bool = False) -> bool:
    """Build or load the extension once per process; True when ``torch.ops.alter_ds`` holds the kernels.

    Failure is not an error: it warns once, naming the reason, and the op uses the PyTorch reference.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    with_cuda = cuda_wanted()
    try:
        compile_extension(with_cuda, build_directory(with_cuda), verbose)
    except ExtensionBuildError as error:
        warnings.warn(
            f"alter-ds: the grouped adapter extension could not be built, so the PyTorch reference runs instead "
            f"(same results, slower). {error}. Set ALTER_DS_GROUPED_ADAPTER=reference to skip the build.",
            RuntimeWarning,
            stacklevel=2,
        )
        _loaded = False
        return False
    from alter_ds.ops import kernels

    kernels.register_python_parts()
    _loaded = True
    return True


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
                compile_extension(True, Path(scratch), args.verbose)
            except ExtensionBuildError as error:
                if "NVIDIA driver" not in str(error) and "no CUDA GPUs" not in str(error):
                    print(f"build: CUDA compile check failed: {error}", file=sys.stderr)
                    return 1
        print(f"build: csrc/ compiles for CUDA {torch.version.cuda}, arch {os.environ.get('TORCH_CUDA_ARCH_LIST')}")
        return 0
    with_cuda = cuda_wanted()
    directory = build_directory(with_cuda)
    try:
        compile_extension(with_cuda, directory, args.verbose)
    except ExtensionBuildError as error:
        print(f"build: {error}", file=sys.stderr)
        return 1
    print(f"build: grouped adapter extension ({'CPU + CUDA' if with_cuda else 'CPU'}) ready in {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
