"""How fast the grouped adapter op is, per implementation, and how close it gets to the memory roofline.

Every MTA layer runs y[N,d] = sum_j w_nj * (act(x @ w_down[e_nj] + b_down[e_nj]) @ w_up[e_nj] + b_up[e_nj])
over all tokens at once. At adapter ranks (r << d) the op moves far more bytes than it computes, so the
question is not FLOPs but how close each implementation gets to a plain device-to-device copy, and whether
it keeps that when the routing is skewed. This times, forward and forward+backward separately (backward
with gradients for x, w_down, b_down, w_up, b_up and expert_weights):
  loop        alter_ds.ops.grouped_adapter.grouped_adapter_loop: the naive per-expert loop (the test oracle);
  reference   grouped_adapter_reference: the vectorised PyTorch fallback (sort by expert, padded bmm);
  grouped_mm  two torch._grouped_mm calls (sort rows by expert, int32 offsets = cumsum of counts, no padding),
              probed once per dtype/device and reported "n/a (reason)" where this torch build lacks it;
  kernel      the compiled op from csrc/ (alter_ds.ops.build.load_extension, then grouped_adapter with
              ALTER_DS_GROUPED_ADAPTER=cpp on CPU or =cuda on CUDA); "not available (reason)" until it builds.

Routing (k=1 hard routing by default; --k K draws K distinct experts per token with random weights summing to 1):
  uniform   every expert equally likely;
  zipf      P(expert of rank i) proportional to 1 / i^1.1 (expert 0 is the most popular);
  single    every token (every slot) goes to expert 0: the worst imbalance a padded implementation can see.

Before timing, each configuration is checked once against the loop oracle run in fp32 on the same (rounded)
inputs, as max|a - b| / max|b| within 1e-4 for fp32 and 2e-2 for bf16/fp16. A forward output that does not
match prints a loud WRONG row and that implementation is not timed. The six gradients are compared the same
way; one above the tolerance marks the row with ⚠ and a note under the table, but is still timed (in bf16,
implementations that keep their intermediates in bf16 can miss 2e-2 on gradients that sum over thousands of
tokens without being wrong kernels).

Timing: --warmup untimed reps, then --reps timed ones; median and p20/p80 in ms. On CUDA each rep is timed
with CUDA events, after an untimed .zero_() of a buffer larger than L2 (256 MB or 2x L2) so no rep starts
with a warm cache; on CPU with time.perf_counter. The forward is timed with autograd recording, as in training.
torch's default thread count is used and printed.

Bytes model (s = element size, W = bytes of the four stacked weight tensors w_down, b_down, w_up, b_up):
  forward           2*N*d*s + W      (read x, write y, read the weights)
  forward+backward  5*N*d*s + 2*W    (read x, write y; read dy, read x again, write dx; read the weights,
                                      write their gradients)
Routing ids, mixture weights and the r-wide hidden activations are left out (small at r << d). GB/s is
bytes / median time; "% roofline" compares the forward+backward GB/s with a device-to-device copy of
4*N*d elements measured in the same run (its read + write bytes over its median time).

    python benchmarks/bench_grouped_adapter.py                      # the full sweep (CUDA when present)
    python benchmarks/bench_grouped_adapter.py --device cpu --quick
    python benchmarks/bench_grouped_adapter.py --d 768 --r 16 --n 8192 --experts 16 --routing uniform

Only torch, the standard library and alter_ds.ops are imported, so it runs on a GPU machine that has
torch and this checkout but none of the training dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import types
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("loop", "reference", "grouped_mm", "kernel")
ROUTINGS = ("uniform", "zipf", "single")
ZIPF_EXPONENT = 1.1
FULL = {"d": [768, 2048, 4096], "r": [8, 16, 64], "n": [8192, 32768], "experts": [4, 16, 64], "routing": ROUTINGS}
QUICK = {"d": [768], "r": [16], "n": [8192], "experts": [16], "routing": ROUTINGS}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
FLUSH_BYTES = 256 * 2**20


def import_ops() -> types.ModuleType:
    """alter_ds.ops.grouped_adapter from this checkout, even where alter_ds/__init__'s own imports are missing.

    The package __init__ pulls in the config and model code (yaml, safetensors); the ops need only torch. When
    that import fails for a reason other than alter_ds itself, the package is registered as a bare module with
    this checkout's path, so its submodules import without running __init__.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module("alter_ds.ops.grouped_adapter")
    except ImportError as error:
        if (error.name or "").split(".")[0] == "alter_ds":
            raise
    for name in [m for m in sys.modules if m == "alter_ds" or m.startswith("alter_ds.")]:
        del sys.modules[name]
    package = types.ModuleType("alter_ds")
    package.__path__ = [str(ROOT / "alter_ds")]
    sys.modules["alter_ds"] = package
    return importlib.import_module("alter_ds.ops.grouped_adapter")


OPS = import_ops()

Impl = Callable[..., torch.Tensor]


def short(error: BaseException, width: int = 90) -> str:
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------------------- implementations


def grouped_mm_adapter(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor | None,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """The op as two torch._grouped_mm calls over the token-expert pairs sorted by expert (no padding)."""
    n_tokens = expert_ids.shape[0]
    order, token_index, group, counts = OPS.sort_by_expert(expert_ids, w_down.shape[0])
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    hidden = torch._grouped_mm(x[token_index], w_down, offs=offsets)
    if b_down is not None:
        hidden = hidden + b_down[group]
    hidden = OPS.apply_activation(hidden, activation)
    out = torch._grouped_mm(hidden, w_up, offs=offsets)
    if b_up is not None:
        out = out + b_up[group]
    out = out * expert_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    return x.new_zeros(n_tokens, x.shape[1]).index_add(0, token_index, out)


def kernel_adapter(*args: object) -> torch.Tensor:
    """The dispatcher; run inside forced_kernel() so it takes the compiled op or raises."""
    return OPS.grouped_adapter(*args)


IMPL_FUNCTIONS: dict[str, Impl] = {
    "loop": OPS.grouped_adapter_loop,
    "reference": OPS.grouped_adapter_reference,
    "grouped_mm": grouped_mm_adapter,
    "kernel": kernel_adapter,
}


@contextlib.contextmanager
def forced_kernel(impl: str, device: torch.device) -> Iterator[None]:
    """Set ALTER_DS_GROUPED_ADAPTER to the compiled op of this device while the kernel runs (untimed)."""
    if impl != "kernel":
        yield
        return
    previous = os.environ.get(OPS.IMPLEMENTATION_ENV)
    os.environ[OPS.IMPLEMENTATION_ENV] = "cuda" if device.type == "cuda" else "cpp"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(OPS.IMPLEMENTATION_ENV, None)
        else:
            os.environ[OPS.IMPLEMENTATION_ENV] = previous


def load_kernel(device: torch.device) -> tuple[bool, str]:
    """Build/load the compiled extension (with its CUDA kernels for a CUDA device); (loaded, how it went)."""
    start = time.perf_counter()
    loader = "load_cuda_extension" if device.type == "cuda" else "load_extension"
    try:
        build = importlib.import_module("alter_ds.ops.build")
        loaded = bool(getattr(build, loader)())
    except Exception as error:
        return False, short(error)
    if not loaded:
        return False, f"alter_ds.ops.build.{loader}() returned False"
    return True, f"loaded by alter_ds.ops.build.{loader}() in {time.perf_counter() - start:.1f} s"


# ------------------------------------------------------------------------------------------------------ problems


@dataclass(frozen=True)
class Config:
    d: int
    r: int
    n: int
    experts: int
    routing: str


@dataclass
class Problem:
    inputs: list[torch.Tensor | None]  # x, expert_ids, expert_weights, w_down, b_down, w_up, b_up
    dy: torch.Tensor
    activation: str

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in self.inputs if t is not None and t.requires_grad]

    def call(self, impl: Impl) -> torch.Tensor:
        return impl(*self.inputs, self.activation)

    def upcast(self) -> Problem:
        """The same values in fp32 as fresh leaves (the oracle's inputs)."""
        inputs = [
            None if t is None else t if not t.is_floating_point() else t.detach().float().requires_grad_()
            for t in self.inputs
        ]
        return Problem(inputs, self.dy.float(), self.activation)


def make_routing(
    config: Config, k: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    n, experts = config.n, config.experts
    if config.routing == "single":
        ids = torch.zeros(n, k, dtype=torch.int64)
    else:
        if k > experts:
            raise ValueError(f"--k {k} needs at least {k} experts for distinct experts per token, got T={experts}")
        if config.routing == "uniform":
            probs = torch.ones(experts, dtype=torch.float64)
        else:
            probs = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** ZIPF_EXPONENT
        if k == 1:
            ids = torch.multinomial(probs, n, replacement=True, generator=generator).view(n, 1)
        else:
            ids = torch.multinomial(probs.expand(n, experts), k, replacement=False, generator=generator)
    if k == 1:
        weights = torch.ones(n, 1)
    else:
        weights = torch.rand(n, k, generator=generator) + 0.05
        weights = weights / weights.sum(dim=1, keepdim=True)
    return ids.to(device), weights.to(device=device, dtype=dtype)


def make_problem(
    config: Config, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, width: int
) -> Problem:
    """Random inputs scaled so activations and outputs are O(1) (relative errors then mean something)."""
    seed = (args.seed * 1_000_003 + zlib.crc32(repr(config).encode())) % 2**31
    cpu_generator = torch.Generator().manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    d, r, experts = config.d, config.r, config.experts

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype).requires_grad_()

    ids, weights = make_routing(config, args.k, cpu_generator, device, dtype)
    x = randn(config.n, d)
    w_down = (torch.rand(experts, d, width, generator=generator, device=device) * 2 - 1) / math.sqrt(d)
    w_down = w_down.to(dtype).requires_grad_()
    b_down = None if args.no_bias else randn(experts, width, scale=0.02)
    w_up = randn(experts, r, d, scale=1 / math.sqrt(r))
    b_up = None if args.no_bias else randn(experts, d, scale=0.02)
    dy = torch.randn(config.n, d, generator=generator, device=device).to(dtype)
    return Problem([x, ids, weights.requires_grad_(), w_down, b_down, w_up, b_up], dy, args.activation)


def weight_bytes(problem: Problem) -> int:
    return sum(t.numel() * t.element_size() for t in problem.inputs[3:] if t is not None)


# -------------------------------------------------------------------------------------------------------- timing


@dataclass
class Stats:
    median: float
    p20: float
    p80: float

    @classmethod
    def of(cls, times_ms: list[float]) -> Stats:
        times = sorted(times_ms)
        return cls(statistics.median(times), times[int(0.2 * (len(times) - 1))], times[int(0.8 * (len(times) - 1))])

    def cell(self) -> str:
        return f"{self.median:.3f} ({self.p20:.3f}–{self.p80:.3f})"


class Timer:
    """Milliseconds per rep: CUDA events after an untimed L2 flush on CUDA, time.perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps
        self.flush: torch.Tensor | None = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
            self.flush = torch.empty(max(FLUSH_BYTES, 2 * l2), dtype=torch.uint8, device=device)

    def measure(self, fn: Callable[[], object], setup: Callable[[], None] | None = None) -> Stats:
        times = []
        for rep in range(self.warmup + self.reps):
            if setup is not None:
                setup()
            if self.flush is not None:
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(self.device)
                elapsed = start.elapsed_time(end)
            else:
                begin = time.perf_counter()
                fn()
                elapsed = (time.perf_counter() - begin) * 1e3
            if rep >= self.warmup:
                times.append(elapsed)
        return Stats.of(times)


def copy_bandwidth(n: int, d: int, dtype: torch.dtype, device: torch.device, timer: Timer) -> float:
    """GB/s of dst.copy_(src) for 4*N*d elements, counting the bytes read and written."""
    src = torch.ones(4 * n * d, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    steady = Timer(device, max(timer.warmup, 2), max(timer.reps, 10))  # cheap: a few more reps for a steadier roof
    stats = steady.measure(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / stats.median / 1e6


def forward_backward(problem: Problem, impl: Impl) -> None:
    problem.call(impl).backward(problem.dy)


def clear_grads(problem: Problem) -> None:
    for leaf in problem.leaves():
        leaf.grad = None


# --------------------------------------------------------------------------------------------------- correctness

GRAD_NAMES = ("x", "expert_ids", "expert_weights", "w_down", "b_down", "w_up", "b_up")


def relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """max|value - truth| / max|truth| (max|value| when truth is all zero)."""
    value, truth = value.detach().double(), truth.detach().double()
    scale = float(truth.abs().max()) or float(value.abs().max()) or 1.0
    return float((value - truth).abs().max()) / scale


@dataclass
class Check:
    """What one implementation did on one configuration before timing."""

    forward: str | None = None  # None = ok, else "n/a (reason)" or the WRONG message
    backward: str | None = None
    wrong: str | None = None  # the forward output does not match: not timed
    grad_warning: str | None = None  # gradients above the tolerance: timed, but flagged
    errors: dict[str, float] = field(default_factory=dict)


def check(problem: Problem, impl: Impl, oracle: tuple[torch.Tensor, list[torch.Tensor | None]], tol: float) -> Check:
    truth_y, truth_grads = oracle
    result = Check()
    clear_grads(problem)
    try:
        y = problem.call(impl)
    except Exception as error:
        result.forward = result.backward = f"n/a ({short(error)})"
        return result
    error = relative_error(y, truth_y)
    result.errors["y"] = error
    if not error <= tol:
        result.wrong = f"forward max rel err {error:.2e} > {tol:.0e}"
        result.forward = result.backward = f"**WRONG: {result.wrong}, not timed**"
        return result
    try:
        y.backward(problem.dy)
    except Exception as error:
        result.backward = f"n/a (backward: {short(error)})"
        return result
    bad = []
    for name, tensor, truth in zip(GRAD_NAMES, problem.inputs, truth_grads):
        if truth is None or tensor is None:
            continue
        grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        error = relative_error(grad, truth)
        result.errors[f"d{name}"] = error
        if not error <= tol:
            bad.append(f"d{name} {error:.1e}")
    if bad:
        result.grad_warning = f"gradient max rel err > {tol:.0e}: {', '.join(bad)}"
    clear_grads(problem)
    return result


def run_oracle(problem: Problem) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The loop oracle in fp32 on the problem's own (rounded) values: output and every gradient."""
    exact = problem.upcast()
    y = exact.call(OPS.grouped_adapter_loop)
    y.backward(exact.dy)
    return y.detach(), [None if t is None or not t.requires_grad else t.grad for t in exact.inputs]


def probe(impl: str, device: torch.device, dtype: torch.dtype, activation: str) -> str | None:
    """None when impl runs forward and backward correctly on a small aligned problem, else the reason it can't."""
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    args = argparse.Namespace(seed=0, k=1, no_bias=False, activation=activation)
    config = Config(d=64, r=16, n=256, experts=4, routing="uniform")
    width = 2 * config.r if OPS.is_gated(activation) else config.r
    problem = make_problem(config, args, device, dtype, width)
    with forced_kernel(impl, device):
        result = check(problem, IMPL_FUNCTIONS[impl], run_oracle(problem), TOLERANCE[dtype])
    if result.forward is not None:
        return f"forward: {result.forward}"
    if result.backward is not None:
        return f"backward: {result.backward}"
    return None


# ---------------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--quick", action="store_true", help="d 768, r 16, N 8192, T 16, every routing, 5 reps")
    parser.add_argument("--d", type=int, nargs="+", help=f"hidden widths (default {FULL['d']})")
    parser.add_argument("--r", type=int, nargs="+", help=f"adapter ranks (default {FULL['r']})")
    parser.add_argument("--n", type=int, nargs="+", help=f"tokens (default {FULL['n']})")
    parser.add_argument("--experts", type=int, nargs="+", help=f"experts T (default {FULL['experts']})")
    parser.add_argument("--routing", choices=ROUTINGS, nargs="+", help="default: all three")
    parser.add_argument("--k", type=int, default=1, help="experts per token (1 = hard routing)")
    parser.add_argument("--activation", choices=OPS.ACTIVATIONS, default="gelu")
    parser.add_argument("--no-bias", action="store_true", help="pass b_down = b_up = None")
    parser.add_argument("--skip", choices=IMPLS, nargs="+", default=[], help="implementations not to run")
    parser.add_argument("--reps", type=int, default=None, help="timed reps (default 20 on CUDA, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed reps first (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    for axis in preset:
        if getattr(args, axis) is None:
            setattr(args, axis, list(preset[axis]))
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.reps = args.reps or (5 if args.quick or not cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if args.k < 1:
        parser.error("--k must be at least 1")
    return args


def header(args: argparse.Namespace, device: torch.device) -> list[str]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none used"
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"GPU: {gpu}",
        f"torch {torch.__version__}{cuda}, {torch.get_num_threads()} threads",
        f"device {device.type}, dtype {args.dtype}, activation {args.activation}, k={args.k}, "
        f"bias {'off' if args.no_bias else 'on'}, warmup {args.warmup}, reps {args.reps}",
        f"command: {shlex.join(['python', *sys.argv])}",
    ]


def time_impl(
    problem: Problem, impl: str, oracle: tuple[torch.Tensor, list[torch.Tensor | None]], timer: Timer
) -> tuple[Check, Stats | None, Stats | None]:
    """Check one implementation, then time its forward and forward+backward unless it is wrong or unsupported."""
    function = IMPL_FUNCTIONS[impl]
    fwd = fwd_bwd = None
    with forced_kernel(impl, timer.device):
        result = check(problem, function, oracle, TOLERANCE[problem.dy.dtype])
        if result.forward is None:
            try:
                fwd = timer.measure(lambda: problem.call(function))
            except Exception as error:
                result.forward = f"n/a ({short(error)})"
        if result.forward is None and result.backward is None:
            try:
                fwd_bwd = timer.measure(lambda: forward_backward(problem, function), lambda: clear_grads(problem))
            except Exception as error:
                result.backward = f"n/a ({short(error)})"
    clear_grads(problem)
    return result, fwd, fwd_bwd


def bench_config(
    config: Config, impls: list[str], args: argparse.Namespace, timer: Timer, copy_gbps: float
) -> list[dict]:
    """Every implementation on one configuration: print its table rows and return them."""
    dtype = DTYPES[args.dtype]
    width = 2 * config.r if OPS.is_gated(args.activation) else config.r
    problem = make_problem(config, args, timer.device, dtype, width)
    oracle = run_oracle(problem)
    activation_bytes = config.n * config.d * problem.dy.element_size()
    bytes_fwd = 2 * activation_bytes + weight_bytes(problem)
    bytes_fwd_bwd = 5 * activation_bytes + 2 * weight_bytes(problem)
    loop_median: float | None = None
    rows = []
    for impl in impls:
        result, fwd, fwd_bwd = time_impl(problem, impl, oracle, timer)
        row: dict = {**config.__dict__, "impl": impl, "max_rel_errors": result.errors}
        row["wrong"], row["grad_warning"] = result.wrong, result.grad_warning
        gbps = roofline = speedup = "–"
        if fwd is not None:
            row.update(fwd_ms=fwd.__dict__, bytes_fwd=bytes_fwd, gbps_fwd=bytes_fwd / fwd.median / 1e6)
        if fwd_bwd is not None:
            rate = bytes_fwd_bwd / fwd_bwd.median / 1e6
            row.update(fwd_bwd_ms=fwd_bwd.__dict__, bytes_fwd_bwd=bytes_fwd_bwd, gbps_fwd_bwd=rate)
            row["roofline_percent"] = 100 * rate / copy_gbps
            gbps, roofline = f"{rate:.1f}", f"{row['roofline_percent']:.1f}"
            if impl == "loop":
                loop_median = fwd_bwd.median
            if loop_median is not None:
                speedup = f"{loop_median / fwd_bwd.median:.2f}x"
        fwd_cell = fwd.cell() if fwd is not None else result.forward
        fwd_bwd_cell = fwd_bwd.cell() if fwd_bwd is not None else result.backward
        print(
            f"| {config.d} | {config.r} | {config.n} | {config.experts} | {config.routing} "
            f"| {impl}{' ⚠' if result.grad_warning else ''} "
            f"| {fwd_cell} | {fwd_bwd_cell} | {gbps} | {roofline} | {speedup} |",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    timer = Timer(device, args.warmup, args.reps)
    for line in header(args, device):
        print(line)

    unavailable: dict[str, str] = {impl: "skipped (--skip)" for impl in args.skip}
    if "kernel" not in unavailable:
        loaded, how = load_kernel(device)
        if loaded:
            print(f"kernel: {how}")
        else:
            unavailable["kernel"] = f"not available ({how})"
    for impl in ("grouped_mm", "kernel"):
        if impl not in unavailable:
            reason = probe(impl, device, dtype, args.activation)
            print(f"{impl} probe ({args.dtype}, {device.type}): {reason or 'ok'}")
            if reason is not None and reason.startswith("forward: n/a"):  # raised; a WRONG one still gets rows
                unavailable[impl] = f"n/a ({reason})"
    impls = [impl for impl in IMPLS if impl not in unavailable]
    for impl, reason in unavailable.items():
        print(f"{impl}: {reason}, no rows")

    copies: dict[tuple[int, int], float] = {}
    for n, d in sorted({(n, d) for n in args.n for d in args.d}):
        copies[n, d] = copy_bandwidth(n, d, dtype, device, timer)
        print(f"roofline: copy of 4*N*d = {4 * n * d} {args.dtype} elements (N={n}, d={d}): {copies[n, d]:.1f} GB/s")
    print()
    print(
        "| d | r | N | T | routing | impl | fwd ms median (p20–p80) | fwd+bwd ms median (p20–p80) "
        "| GB/s fwd+bwd | % roofline | speed-up fwd+bwd vs loop |"
    )
    print("|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|")
    sys.stdout.flush()

    rows: list[dict] = []
    for values in itertools.product(args.d, args.r, args.n, args.experts, args.routing):
        config = Config(*values)
        rows += bench_config(config, impls, args, timer, copies[config.n, config.d])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    for row in rows:
        where = ", ".join(f"{name}={row[name]}" for name in Config.__dataclass_fields__)
        if row["wrong"]:
            print(f"WARNING: WRONG RESULT, not timed: {row['impl']} at {where}: {row['wrong']}")
        if row["grad_warning"]:
            print(f"⚠ {row['impl']} at {where}: {row['grad_warning']} (forward matched; timed anyway)")
    wrong = sum(1 for row in rows if row["wrong"])
    if wrong:
        print(f"WARNING: {wrong} implementation/configuration pairs gave a WRONG forward output", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header(args, device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
