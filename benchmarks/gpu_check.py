"""Check and time sparsecc's 2:4 sparse tensor-core kernel on an NVIDIA GPU (A100: sm_80, H100/H200: sm_90).

For every weight shape (N, K) and token count T this makes a random 2:4 weight (the 2 largest |w|
of every 4 inputs kept), packs it with ``pack_2_4``, builds sparsecc's ``mma.sp`` kernel
(``tensor_core_linear``) with ``tvm.compile`` for the chosen architecture and runs it on the GPU
through DLPack views of torch tensors. It then

* checks the kernel's y (T, N) fp32 against the masked-dense layer computed by torch on the GPU,
  ``x.float() @ w.float().T + b`` (fp32, TF32 off), and fails loudly above ``--tolerance``;
* times, interleaved in one run (median of ``--repeat`` rounds, warm-up first): sparsecc's kernel,
  dense fp16/bf16 ``F.linear`` (cuBLAS) and torch's own 2:4 path (``to_sparse_semi_structured``,
  cuSPARSELt or CUTLASS), padding x with zero rows where torch refuses the token count;
* prints a markdown table, plus the GPU name and the torch / TVM versions.

Tolerance: the error is ``max|y - ref| / max|ref|``. Both sides form the very same products (16-bit
times 16-bit is exact in fp32, for fp16 and for bf16 alike, and the reference converts the same
rounded x and w), so the data type does not enter: they differ only in the order of the fp32
additions and in how the tensor cores round their fp32 accumulator, which stays below ~1e-4 even
at K = 4096. A wrong index or metadata bit moves an output by a whole product, about 1e-3 of
max|ref| or more at these shapes, hence the default of 2e-3 for both types.

Times are per call in a stream of back-to-back calls from Python (synchronised around each block,
``time.perf_counter``), so for the smallest layers they include each framework's launch cost,
which is part of what a user pays.

Without a GPU the script still builds the kernels' CUDA code for the first shape (``--arch``,
default sm_80), compiles it to a cubin with nvcc where nvcc is installed (registers, spills and
``HMMA.SP`` count in the SASS where nvdisasm is), checks the kernel's addressing through the CPU
model (``simulate_linear``) on small cases, and exits with status 2: it measures nothing.

``--artifact DIR`` instead checks a folder written by ``sparsecc compile ... --target cuda-sm80``:
the compiled model against its masked-dense reference on the same random inputs.

Run ``python benchmarks/gpu_check.py --help``. Exit status: 0 all checks passed, 1 a check failed,
2 no GPU here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]
TOKENS = [1, 16, 128, 512]
ARCHS = ("sm_80", "sm_90")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_TOLERANCE = 2e-3
#: x is padded to a multiple of this many rows where torch's 2:4 path refuses the token count
TORCH_24_ROW_MULTIPLE = 32
NO_GPU_EXIT = 2
#: allowed max relative difference of a compiled GPU model from its masked-dense reference, as
#: ``sparsecc compile`` allows for models with 16-bit kernels
ARTIFACT_TOLERANCE = 1e-2
#: where the kernels run (a module constant so a CPU test can stand a model in for the GPU)
DEVICE = "cuda"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS,
                   help="CUDA architecture to build for (default: the GPU's, from its compute capability; "
                        "sm_80 without a GPU)")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                   help="comma-separated weight shapes NxK (output channels x inputs, multiples of 32)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts T")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="type of x and the weight")
    p.add_argument("--repeat", type=int, default=30, help="interleaved timing rounds; the median is reported")
    p.add_argument("--all-schedules", action="store_true",
                   help="time every candidate schedule of sparsecc's kernel and report the fastest")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest accepted max|y - ref| / max|ref| (see the module docstring)")
    p.add_argument("--artifact", metavar="DIR",
                   help="check a `sparsecc compile ... --target cuda-sm80` artifact instead of the kernels")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    args = p.parse_args(argv)
    try:
        args.shape_list = [_shape(s) for s in args.shapes.split(",")]
        args.token_list = [int(t) for t in args.tokens.split(",")]
    except ValueError as exc:
        p.error(str(exc))
    if any(t < 1 for t in args.token_list) or args.repeat < 1:
        p.error("token counts and --repeat must be positive")
    for n_out, k in args.shape_list:
        if n_out <= 0 or k <= 0 or n_out % 32 or k % 32:
            p.error(f"shape {n_out}x{k}: the 2:4 tensor-core kernel needs N and K positive multiples of 32")
    return args


def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().strip().split("x")
    if len(parts) != 2:
        raise ValueError(f"shape {text!r}: write it as NxK, e.g. 3072x768")
    return int(parts[0]), int(parts[1])


# --- problem data --------------------------------------------------------------------------------

def random_2_4_weight(n_out: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A random (n_out, k) weight of ``dtype`` (on the CPU) keeping the 2 largest |w| of every 4 inputs."""
    w = torch.randn(n_out, k // 4, 4, generator=gen)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.abs().topk(2, dim=-1).indices, True)
    return torch.where(keep, w, torch.zeros(())).reshape(n_out, k).to(dtype)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got - ref| / max|ref|, in float64."""
    got, ref = got.double(), ref.double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def kernel_name(n_out: int, k: int, tokens: int, index: int) -> str:
    return f"sparsecc_tc_{n_out}x{k}_t{tokens}_s{index}"


# --- the GPU run ---------------------------------------------------------------------------------

def detect_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    if major == 8:
        return "sm_80"  # sm_86 / sm_89 run sm_80 code too
    if major == 9:
        return "sm_90"
    raise SystemExit(f"compute capability {major}.{minor}: sparsecc's sparse tensor-core kernel is built for "
                     f"{' and '.join(ARCHS)} (A100, H100/H200); pass --arch to try one anyway")


def build_kernel(func: Any, arch: str) -> Callable[..., Any]:
    """The callable of a TIR-only module holding ``func``, compiled for CUDA ``arch``."""
    import tvm

    name = str(func.attrs["global_symbol"])
    built = tvm.compile(tvm.IRModule({name: func}), target=tvm.target.Target({"kind": "cuda", "arch": arch}))
    return built[name]


def time_interleaved(fns: dict[str, Callable[[], Any]], repeat: int, block_s: float = 2e-3,
                     warmup: int = 5) -> dict[str, float]:
    """Median seconds per call of each function: ``repeat`` rounds, each timing one block of every
    function in turn (the order rotating by round), a block being enough back-to-back calls to
    last about ``block_s``, synchronised before and after."""
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        calls[name] = max(1, min(10_000, int(block_s / max(time.perf_counter() - start, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = fns[name], calls[name]
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass
class Cell:
    n_out: int
    k: int
    tokens: int
    schedule: str = ""
    error: float = float("nan")
    sparsecc_s: float | None = None
    default_s: float | None = None
    dense_s: float | None = None
    torch_24_s: float | None = None
    notes: list[str] = field(default_factory=list)


def run_cell(n_out: int, k: int, tokens: int, args: argparse.Namespace, gen: torch.Generator) -> Cell:
    """Build, check and time one (shape, tokens)."""
    import tvm
    from sparsecc.targets.kernels.tensor_core import tensor_core_linear, tensor_core_schedules
    from sparsecc.targets.tensor_core_2_4 import pack_2_4

    cell = Cell(n_out, k, tokens)
    dtype = DTYPES[args.dtype]
    dev = torch.device(DEVICE)
    w_cpu = random_2_4_weight(n_out, k, dtype, gen)
    values, metadata = (t.to(dev) for t in pack_2_4(w_cpu))
    w = w_cpu.to(dev)
    x = torch.randn(tokens, k, generator=gen).to(dtype).to(dev)
    bias = torch.randn(n_out, generator=gen).to(dev)
    y = torch.empty(tokens, n_out, dtype=torch.float32, device=dev)
    ref = x.float() @ w.float().T + bias

    # sparsecc: every candidate schedule (or the default only), each checked before any timing
    tvm_args = [tvm.runtime.from_dlpack(t) for t in (x, values, metadata, bias, y)]
    schedules = tensor_core_schedules(tokens, n_out, k)
    if not args.all_schedules:
        schedules = schedules[:1]
    fns: dict[str, Callable[[], Any]] = {}
    described: dict[str, str] = {}
    errors: dict[str, float] = {}
    for index, sched in enumerate(schedules):
        name = kernel_name(n_out, k, tokens, index)
        kernel = build_kernel(tensor_core_linear(tokens, n_out, k, True, name, schedule=sched, dtype=args.dtype),
                              args.arch)
        y.fill_(float("nan"))
        kernel(*tvm_args)
        torch.cuda.synchronize()
        error = relative_error(y, ref)
        if not error <= args.tolerance:  # NaN fails too
            cell.schedule, cell.error = sched.describe(), error
            cell.notes.append(f"FAILED: {sched.describe()} has max relative error {error:.3g} "
                              f"(tolerance {args.tolerance:g})")
            return cell
        fns[name] = lambda kernel=kernel: kernel(*tvm_args)
        described[name] = sched.describe()
        errors[name] = error

    # the dense bar: cuBLAS through F.linear on the masked weight, same 16-bit type
    bias16 = bias.to(dtype)
    fns["dense"] = lambda: torch.nn.functional.linear(x, w, bias16)

    # torch's own 2:4 path; it may refuse small token counts: pad x with zero rows and say so
    try:
        w_sparse = torch.sparse.to_sparse_semi_structured(w)
    except Exception as exc:  # torch's refusal is reported, not fatal
        cell.notes.append(f"torch 2:4 refused the weight: {type(exc).__name__}: {exc}")
    else:
        x_24 = x
        try:
            out = torch.nn.functional.linear(x_24, w_sparse, bias16)
        except Exception as exc:
            padded = -(-tokens // TORCH_24_ROW_MULTIPLE) * TORCH_24_ROW_MULTIPLE
            x_24 = torch.cat([x, x.new_zeros(padded - tokens, k)])
            try:
                out = torch.nn.functional.linear(x_24, w_sparse, bias16)[:tokens]
            except Exception as exc2:
                cell.notes.append(f"torch 2:4 refused T={tokens} ({type(exc).__name__}: {exc}) and T={padded} "
                                  f"({type(exc2).__name__}: {exc2})")
                out = None
            else:
                cell.notes.append(f"torch 2:4 refused T={tokens} ({type(exc).__name__}); timed with x padded to "
                                  f"{padded} rows")
        if out is not None:
            cell.notes.append(f"torch 2:4 output ({args.dtype}) max relative error {relative_error(out, ref):.2g}")
            fns["torch_24"] = lambda: torch.nn.functional.linear(x_24, w_sparse, bias16)

    times = time_interleaved(fns, args.repeat)
    best = min(described, key=lambda name: times[name])
    cell.schedule, cell.error = described[best], errors[best]
    cell.sparsecc_s = times[best]
    cell.default_s = times[kernel_name(n_out, k, tokens, 0)]
    cell.dense_s = times["dense"]
    cell.torch_24_s = times.get("torch_24")
    return cell


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _ratio(num: float | None, den: float | None) -> str:
    return "-" if num is None or den is None else f"{num / den:.2f}"


def print_table(cells: list[Cell], all_schedules: bool) -> None:
    head = ["N x K", "tokens", "schedule", "sparsecc µs"]
    if all_schedules:
        head.append("default sched µs")
    head += ["cuBLAS dense µs", "torch 2:4 µs", "x dense", "x torch 2:4", "max rel err"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for c in cells:
        row = [f"{c.n_out}x{c.k}", str(c.tokens), c.schedule, _us(c.sparsecc_s)]
        if all_schedules:
            row.append(_us(c.default_s))
        row += [_us(c.dense_s), _us(c.torch_24_s), _ratio(c.dense_s, c.sparsecc_s),
                _ratio(c.torch_24_s, c.sparsecc_s), f"{c.error:.2g}"]
        print("| " + " | ".join(row) + " |")


def run_gpu(args: argparse.Namespace) -> int:
    import tvm
    from sparsecc.targets.cuda import prepare_cuda_jit

    prepare_cuda_jit()  # TVM compiles the kernels' CUDA source at load: NVRTC or nvcc

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32
    print(f"GPU: {torch.cuda.get_device_name()} (compute capability "
          f"{'.'.join(map(str, torch.cuda.get_device_capability()))}), kernels built for {args.arch}, "
          f"{args.dtype}; torch {torch.__version__}, tvm {tvm.__version__}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    cells: list[Cell] = []
    with torch.no_grad():
        for n_out, k in args.shape_list:
            for tokens in args.token_list:
                start = time.perf_counter()
                cell = run_cell(n_out, k, tokens, args, gen)
                cells.append(cell)
                print(f"  {n_out}x{k} T={tokens}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print()
    print_table(cells, args.all_schedules)
    print(f"\nmedian of {args.repeat} interleaved rounds per cell; x dense / x torch 2:4 = their time / sparsecc's; "
          "max rel err = max|y - ref| / max|ref| of sparsecc's kernel against torch's fp32 masked-dense layer"
          + (" (the best of all candidate schedules)" if args.all_schedules else ""))
    for c in cells:
        for note in c.notes:
            print(f"- {c.n_out}x{c.k} T={c.tokens}: {note}")
    failed = [c for c in cells if c.sparsecc_s is None]
    if failed:
        print(f"\nFAILED: {len(failed)} of {len(cells)} cells exceed the tolerance {args.tolerance:g} "
              "(their notes above name the schedule); sparsecc's kernel computes wrong results there",
              file=sys.stderr)
        return 1
    print(f"\nall {len(cells)} cells within max relative error {args.tolerance:g}")
    return 0


# --- without a GPU -------------------------------------------------------------------------------

def run_without_gpu(args: argparse.Namespace) -> int:
    """Build the first shape's kernels for ``args.arch``, compile them where nvcc is, check the
    kernel's addressing through the CPU model, and say that nothing was measured."""
    import tvm
    from sparsecc.targets import cuda_toolchain
    from sparsecc.targets.kernels.tensor_core import tensor_core_linear, tensor_core_schedules
    from sparsecc.targets.tensor_core_2_4 import pack_2_4
    from sparsecc.targets.tensor_core_model import simulate_linear

    print(f"no CUDA GPU here (torch {torch.__version__}, tvm {tvm.__version__}): building for {args.arch}, "
          f"{args.dtype}, and checking through the CPU model", flush=True)
    n_out, k = args.shape_list[0]
    funcs = {}
    for tokens in args.token_list:
        sched = tensor_core_schedules(tokens, n_out, k)[0]
        name = kernel_name(n_out, k, tokens, 0)
        funcs[name] = tensor_core_linear(tokens, n_out, k, True, name, schedule=sched, dtype=args.dtype)
        print(f"  {name}: {sched.describe()}")
    source = cuda_toolchain.cuda_source(funcs, args.arch)
    print(f"CUDA source for {n_out}x{k}, T in {args.token_list}: {len(funcs)} kernels, "
          f"{len(source.splitlines())} lines")
    if "mma.sp" not in source:
        print("FAILED: the generated CUDA source has no mma.sp", file=sys.stderr)
        return 1
    missing = cuda_toolchain.missing()
    if any(tool.startswith("nvcc") for tool in missing):
        print("nvcc is not installed: the source was not compiled to a cubin")
    else:
        with tempfile.TemporaryDirectory() as folder:
            cubin = cuda_toolchain.compile_cubin(source, args.arch, folder)
            for res in cubin.kernels:
                print(f"  cubin {args.arch} {res.name}: {res.registers} registers, spills "
                      f"{res.spill_stores} B stored / {res.spill_loads} B loaded")
            if any(tool.startswith("nvdisasm") for tool in missing):
                print("nvdisasm is not installed: SASS not inspected")
            else:
                hmma = cuda_toolchain.sass(cubin).count("HMMA.SP")
                print(f"  SASS: {hmma} HMMA.SP instructions")
                if not hmma:
                    print("FAILED: the cubin has no HMMA.SP", file=sys.stderr)
                    return 1

    # the CPU model runs the kernel's own index arithmetic: small cases, every candidate schedule
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    worst = 0.0
    cases = 0
    for tokens, (m_out, m_k) in ((8, (128, 128)), (40, (128, 256))):
        w = random_2_4_weight(m_out, m_k, dtype, gen)
        values, metadata = pack_2_4(w)
        x = torch.randn(tokens, m_k, generator=gen).to(dtype)
        bias = torch.randn(m_out, generator=gen)
        ref = x.double() @ w.double().T + bias.double()
        for sched in tensor_core_schedules(tokens, m_out, m_k):
            error = relative_error(torch.from_numpy(simulate_linear(x, values, metadata, bias, sched)), ref)
            cases += 1
            worst = max(worst, error)
            if not error <= args.tolerance:
                print(f"FAILED: CPU model of {sched.describe()}, T={tokens}, {m_out}x{m_k}: max relative error "
                      f"{error:.3g} (tolerance {args.tolerance:g})", file=sys.stderr)
                return 1
    print(f"CPU model: {cases} (schedule, shape) cases agree with the masked-dense layer, worst max relative "
          f"error {worst:.2g}")
    print("\nno CUDA GPU here: the kernels were built (and checked through the CPU model) but timing and on-GPU "
          "numerics need a GPU; run this script on a machine with an NVIDIA A100/H100. Nothing was measured.",
          file=sys.stderr)
    return NO_GPU_EXIT


# --- a compiled artifact -------------------------------------------------------------------------

def check_artifact(args: argparse.Namespace) -> int:
    """Run a compiled artifact and its masked-dense reference on the same random inputs."""
    import sparsecc
    from torch.utils._pytree import tree_leaves

    art = sparsecc.load(args.artifact)
    gen = torch.Generator().manual_seed(args.seed)
    # random floats of the signature's shapes; other inputs (token ids, ...) are the saved examples
    inputs = tuple(torch.randn(e.shape, generator=gen).to(e.dtype) if e.is_floating_point() else e.clone()
                   for e in art.example_inputs)
    print(f"artifact {args.artifact}: target {art.target}, inputs "
          f"{[(tuple(t.shape), str(t.dtype).replace('torch.', '')) for t in inputs]}")
    try:
        got = art(*inputs)
    except Exception as exc:  # its own message says what it needs
        if torch.cuda.is_available():
            raise
        print(f"the artifact did not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return NO_GPU_EXIT
    ref = art.reference(*inputs)
    errors = [relative_error(g.detach().cpu(), r.detach().cpu()) for g, r in zip(tree_leaves(got), tree_leaves(ref),
                                                                                  strict=True)]
    worst = max(errors, default=0.0)
    ok = worst <= ARTIFACT_TOLERANCE
    print(f"compiled model vs masked-dense reference: max relative difference {worst:.3g} over {len(errors)} "
          f"output(s): {'ok' if ok else 'FAILED'} (allowed {ARTIFACT_TOLERANCE:g}: the sparse layers round x and "
          "their weights to fp16, the reference stays fp32)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sparsecc.errors import SparseccError

    try:
        if args.artifact:
            return check_artifact(args)
        if not torch.cuda.is_available():
            args.arch = args.arch or "sm_80"
            return run_without_gpu(args)
        args.arch = args.arch or detect_arch()
        return run_gpu(args)
    except SparseccError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
