"""Builds the CUDA kernels of csrc/cuda/ for the CPU device emulation (tests/cuda_emulation/include/) and
registers them as ``torch.ops.alter_ds_emulated``, with the extension's own fake and autograd parts.

The sources are copied with four textual rewrites that C++ cannot express through headers: a launch
``kernel<<<grid, block, shared, stream>>>(args)`` becomes ``emu::launch(body, grid, block, shared, stream)(args)``,
the ``extern __shared__`` array becomes the emulated block's dynamic shared memory, ``is_cuda()`` becomes
``is_cpu()`` (emulated device memory is host memory), and the kernels register for CPU tensors under their own
op namespace. Each rewrite must match, so a change to the sources that escapes one fails the build instead of
testing something else."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from alter_ds.ops import kernels
from alter_ds.ops.build import build_directory

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
INCLUDE = Path(__file__).resolve().parent / "cuda_emulation" / "include"
NAMESPACE = "alter_ds_emulated"

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<(.*?)>>>\s*\(", re.DOTALL)
_DYNAMIC_SHARED = re.compile(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];")
_SCHEMAS = re.compile(r"TORCH_LIBRARY\(alter_ds, m\) \{.*?\n\}", re.DOTALL)


def emulated_sources() -> dict[str, str]:
    """Relative path -> text of the rewritten csrc/ tree (the .cu becomes a .cpp)."""
    out: dict[str, str] = {"activations.h": (CSRC / "activations.h").read_text()}
    seen = {"launch": 0, "shared": 0, "is_cuda": 0, "registration": 0}
    for path in sorted((CSRC / "cuda").iterdir()):
        text = path.read_text()
        text, n = _LAUNCH.subn(r'::emu::launch("\1", [=](auto... emu_args) { \1(emu_args...); }, \2)(', text)
        seen["launch"] += n
        text, n = _DYNAMIC_SHARED.subn(r"unsigned char* \1 = ::emu::dynamic_shared_memory();", text)
        seen["shared"] += n
        seen["is_cuda"] += text.count(".is_cuda()")
        text = text.replace(".is_cuda()", ".is_cpu()")
        old = "TORCH_LIBRARY_IMPL(alter_ds, CUDA, m)"
        seen["registration"] += text.count(old)
        text = text.replace(old, f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)")
        name = f"cuda/{path.stem}.cpp" if path.suffix == ".cu" else f"cuda/{path.name}"
        out[name] = text
    missing = [what for what, count in seen.items() if count == 0]
    if missing:
        raise RuntimeError(f"device emulation: the rewrites {missing} matched nothing in csrc/cuda/; update {__file__}")
    schemas = _SCHEMAS.search((CSRC / "grouped_adapter.cpp").read_text())
    if schemas is None:
        raise RuntimeError("device emulation: no TORCH_LIBRARY(alter_ds, m) block in csrc/grouped_adapter.cpp")
    out["schemas.cpp"] = _LIBRARY.format(
        namespace=NAMESPACE,
        schemas=schemas.group(0).replace("TORCH_LIBRARY(alter_ds, m)", f"TORCH_LIBRARY({NAMESPACE}, m)"),
    )
    return out


# The op schemas of csrc/grouped_adapter.cpp under the emulation's namespace, and the launch log.
_LIBRARY = """#include <torch/library.h>

#include "device_emulation.h"

{schemas}

static std::vector<std::string> launched_kernels(bool clear) {{
  std::vector<std::string> names = emu::launch_log();
  if (clear) emu::launch_log().clear();
  return names;
}}

TORCH_LIBRARY_FRAGMENT({namespace}, m) {{
  m.def("launched_kernels(bool clear) -> str[]", &launched_kernels);
}}
"""

_loaded = False


def load_emulated_library(address_sanitizer: bool = False) -> None:
    """Compile (once; ninja reuses the build while the sources are unchanged) and load the emulated kernels.

    ``address_sanitizer`` builds them with ``-fsanitize=address``: out-of-bounds reads and writes of the kernels
    in host memory stop the process with a report (what compute-sanitizer's memcheck finds on a GPU). The process
    must then start with libasan preloaded (``LD_PRELOAD=$(g++ -print-file-name=libasan.so)``)."""
    global _loaded
    if _loaded:
        return
    from torch.utils.cpp_extension import load

    sources = emulated_sources()
    digest = hashlib.sha256(str(address_sanitizer).encode())
    for name in sorted(sources):
        digest.update(name.encode() + sources[name].encode())
    for header in sorted(INCLUDE.rglob("*.h")):
        digest.update(header.read_bytes())
    flavour = "-emulated-cuda" + ("-asan" if address_sanitizer else "")
    cpu_build = build_directory("cpu")
    directory = cpu_build.with_name(cpu_build.name + flavour)
    source_dir = directory / "src"
    for name, text in sources.items():
        target = source_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text() != text:  # unchanged files keep their mtime for ninja
            target.write_text(text)
    sanitizer = ["-fsanitize=address", "-fno-omit-frame-pointer"] if address_sanitizer else []
    load(
        name="alter_ds_grouped_adapter_emulated_" + digest.hexdigest()[:12],
        sources=[str(source_dir / "cuda" / "grouped_adapter.cpp"), str(source_dir / "schemas.cpp")],
        extra_cflags=["-O2", "-g" if address_sanitizer else "-g0", *sanitizer],
        extra_ldflags=sanitizer,
        extra_include_paths=[str(INCLUDE)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=bool(os.environ.get("ALTER_DS_EMULATION_VERBOSE")),
    )
    kernels.register_python_parts(NAMESPACE)
    _loaded = True


def emulated_grouped_adapter(x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, activation):
    """The CUDA kernels' output on CPU tensors, differentiable like ``alter_ds.ops.grouped_adapter``."""
    args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in (x, expert_ids, expert_weights)]
    weights = [a.contiguous() if a is not None else None for a in (w_down, b_down, w_up, b_up)]
    return torch.ops.alter_ds_emulated.grouped_adapter(*args, *weights, activation)[0]


def launched_kernels() -> list[str]:
    """The kernels launched since the last call, in order (``tc::forward_kernel<T, 2>``, ...)."""
    return list(torch.ops.alter_ds_emulated.launched_kernels(True))
