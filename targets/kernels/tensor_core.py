"""2:4 sparse linear on NVIDIA sparse tensor cores: y = x @ W.T + b with ``mma.sp`` (sm_80, sm_90).

The weight arrives packed by :func:`sparsecc.targets.tensor_core_2_4.pack_2_4`: values (N, K/2)
fp16 or bf16 and int16 metadata (N, K/16) in the CUTLASS / cuSPARSELt order. x is (T, K) of the
same 16-bit type, y is (T, N) fp32 (fp32 accumulation throughout).

Shape of the computation
------------------------
The weight is the sparse ``A`` operand of ``mma.sp.sync.aligned.m16n8k32.row.col.f32`` (16 weight
rows by 32 inputs, stored as 16 x 16), x supplies ``B`` (32 inputs by 8 tokens), so output
channels run along the instruction's M and tokens along its N. One thread block computes
``block_rows`` weight rows by ``block_tokens`` tokens; each warp owns 32 weight rows by
``warp_tokens`` tokens. 32 rows is one block of the metadata's row interleave: one 32-bit
shared-memory load per lane per 32 inputs hands every lane its metadata for *both* 16-row halves,
lanes 0-1 of each quad holding rows 0-15 (sparsity selector 0) and lanes 2-3 rows 16-31
(selector 1); that is what the interleave is for.

Per K step of ``block_k`` inputs the block copies its slice of values, metadata and x into shared
memory with 16-byte ``cp.async`` (``stages`` buffers, so the copy of step k+1 overlaps the
``mma.sp`` of step k), then every warp reads its fragments from shared memory and issues
``2 x warp_tokens / 8`` ``mma.sp`` per 32 inputs. The 16-byte chunks of each row of the value and
x tiles are stored XOR-swizzled by the row (:func:`swizzle`), so the eight quads of a warp,
reading eight rows at once, hit eight different groups of banks. Tokens past T read the last
token's row (no out-of-bounds access, no branch in the copy) and are not stored.

Small M (decode) uses 8-token tiles: the instruction's N is 8, so at one token 7/8 of its B
operand is padding, which is the price of reading the weight at half the bytes.

The index arithmetic (which lane holds which element of which fragment, which thread copies which
16 bytes) is written once, in the plain functions below, on values that may be Python ints, numpy
arrays or TIR expressions: the TIR builder calls them with TIR variables, and the CPU model
(:mod:`sparsecc.targets.tensor_core_model`) with numpy lane arrays, so the model checks the very
addressing the kernel uses.
"""

from __future__ import annotations

import dataclasses

from ._common import ceil_div, drop_param, finish

__all__ = ["TensorCoreSchedule", "tensor_core_linear", "tensor_core_schedule", "tensor_core_schedules"]

#: one mma.sp: 16 weight rows, 8 tokens, 32 inputs (16 stored per row)
MMA_M, MMA_N, MMA_K = 16, 8, 32
#: weight rows of one warp (one metadata interleave block, two mma.sp M halves)
WARP_ROWS = 32
#: static shared memory a CUDA kernel may declare (48 KiB; more needs a dynamic opt-in)
SHARED_LIMIT = 48 * 1024
#: 32-bit words per cp.async (16 bytes)
CHUNK_WORDS = 4
#: the instruction, as TVM's T.ptx table spells it (per element type)
MMA_SP = {"float16": "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32",
          "bfloat16": "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32"}


@dataclasses.dataclass(frozen=True)
class TensorCoreSchedule:
    """Tile sizes of the sparse tensor-core GEMM."""

    block_rows: int = 64  # weight rows per thread block, a multiple of 32 (one warp row each 32)
    block_tokens: int = 64  # tokens per thread block, a multiple of warp_tokens
    warp_tokens: int = 32  # tokens per warp, a multiple of 8
    block_k: int = 64  # inputs per pipeline step, 32 or 64
    stages: int = 2  # shared-memory buffers in flight

    def __post_init__(self) -> None:
        if self.block_rows % WARP_ROWS or self.warp_tokens % MMA_N or self.block_tokens % self.warp_tokens:
            raise ValueError(f"{self}: block_rows must be a multiple of 32, warp_tokens of 8, "
                             "block_tokens of warp_tokens")
        if self.block_k not in (32, 64) or self.stages < 1:
            raise ValueError(f"{self}: block_k must be 32 or 64 and stages at least 1")
        if self.shared_bytes() > SHARED_LIMIT:
            raise ValueError(f"{self.describe()}: {self.shared_bytes()} bytes of shared memory, above the "
                             f"{SHARED_LIMIT} a kernel may declare statically; use fewer stages or smaller tiles")

    @property
    def warps_m(self) -> int:
        return self.block_rows // WARP_ROWS

    @property
    def warps_n(self) -> int:
        return self.block_tokens // self.warp_tokens

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def a_words(self) -> int:
        """32-bit words of one row of the value tile (block_k / 2 values of 2 bytes)."""
        return self.block_k // 4

    @property
    def x_words(self) -> int:
        return self.block_k // 2

    @property
    def k_steps(self) -> int:
        """mma.sp K steps (32 inputs each) per pipeline step."""
        return self.block_k // MMA_K

    def shared_bytes(self) -> int:
        per_stage = (self.block_rows * self.a_words + self.block_tokens * self.x_words
                     + self.k_steps * self.block_rows) * 4
        return per_stage * self.stages

    def describe(self) -> str:
        return (f"mma.sp m16n8k32 block {self.block_rows}x{self.block_tokens} warp 32x{self.warp_tokens} "
                f"k{self.block_k} stages{self.stages}")


def tensor_core_schedules(tokens: int, n_out: int, k: int) -> list[TensorCoreSchedule]:
    """Candidates for one layer, the heuristic default first: token tiles from 8 up to 64 (never
    much wider than the tokens), 64 or 128 weight rows per block, K steps of 64 where K allows."""
    check_shape(n_out, k)
    default = tensor_core_schedule(tokens, n_out, k)
    out = [default]
    block_k = 64 if k % 64 == 0 else 32
    for block_tokens in (8, 16, 32, 64):
        if block_tokens > max(8, 2 * tokens):
            break
        for block_rows in (64, 128):
            if n_out % block_rows:
                continue
            candidate = TensorCoreSchedule(block_rows, block_tokens, min(block_tokens, 32), block_k)
            if candidate not in out:
                out.append(candidate)
    return out


def tensor_core_schedule(tokens: int, n_out: int, k: int) -> TensorCoreSchedule:
    """The heuristic tile for T tokens: the narrowest token tile (in powers of two from 8 to 64)
    that covers them, 64 weight rows per block (more blocks for the SMs at small T), K steps of 64
    where K is a multiple of 64."""
    check_shape(n_out, k)
    block_tokens = 8
    while block_tokens < min(tokens, 64):
        block_tokens *= 2
    return TensorCoreSchedule(64 if n_out % 64 == 0 else 32, block_tokens, min(block_tokens, 32),
                              64 if k % 64 == 0 else 32)


def check_shape(n_out: int, k: int) -> None:
    """The packing's grid: weight rows a multiple of 32, inputs a multiple of 32."""
    if n_out % WARP_ROWS or k % MMA_K:
        raise ValueError(f"sparse tensor-core linear {n_out}x{k}: needs output channels and inputs that are "
                         "multiples of 32 (the 2:4 packing's grid); keep this layer dense")


# --- index arithmetic shared by the kernel and its CPU model -------------------------------------
# ``lane`` is 0..31 within a warp; g = lane // 4 (the quad, a row of the fragment), t = lane % 4.

def a_fragment(lane, row0, step, reg):
    """(row, word) in the value tile of register ``reg`` (0-3) of the A (weight) operand of the
    mma.sp on weight rows row0..row0+15 and K step ``step`` of the tile. Registers 0, 1 hold stored
    columns 2t, 2t+1 of rows g, g+8; registers 2, 3 stored columns 2t+8, 2t+9 (a word is two
    stored values)."""
    g, t = lane // 4, lane % 4
    return row0 + g + 8 * (reg % 2), step * (MMA_K // 4) + t + 4 * (reg // 2)


def b_fragment(lane, token0, step, reg):
    """(token, word) in the x tile of register ``reg`` (0-3) of the B operand for tokens
    token0..token0+7: inputs 2t + 8 reg and 2t + 8 reg + 1 of token g."""
    g, t = lane // 4, lane % 4
    return token0 + g, step * (MMA_K // 2) + t + 4 * reg


def metadata_word(lane, row0, step):
    """(step, column) in the metadata tile of the lane's 32-bit metadata for the warp's 32 rows
    from ``row0``: lanes 0-1 of a quad carry rows 0-15 (selector 0), lanes 2-3 rows 16-31."""
    return step, row0 + lane


def c_fragment(lane, row0, token0, reg):
    """(weight row, token) of accumulator register ``reg`` (0-3) of one m16n8 tile."""
    g, t = lane // 4, lane % 4
    return row0 + g + 8 * (reg // 2), token0 + 2 * t + reg % 2


def swizzle(row, word, words_per_row: int):
    """Where word ``word`` of tile row ``row`` is stored in shared memory: its 16-byte chunk XORed
    with the row's position among the rows that share one pass over the 32 banks, so that eight
    consecutive rows' chunks land in eight different bank groups (words_per_row: 8, 16 or 32)."""
    chunks = words_per_row // CHUNK_WORDS
    rows_per_pass = max(1, 8 // chunks)
    return ((word // CHUNK_WORDS) ^ ((row // rows_per_pass) % chunks)) * CHUNK_WORDS + word % CHUNK_WORDS


def value_chunk(chunk, sched: TensorCoreSchedule):
    """(tile row, tile word) of one 16-byte copy of the value tile; copy ``chunk`` reads stored
    values ``(block row0 + row, k0 / 2 + 2 * word)`` onwards."""
    per_row = sched.a_words // CHUNK_WORDS
    return chunk // per_row, (chunk % per_row) * CHUNK_WORDS


def x_chunk(chunk, sched: TensorCoreSchedule):
    """(tile token, tile word) of one 16-byte copy of the x tile (inputs ``k0 + 2 * word`` on)."""
    per_row = sched.x_words // CHUNK_WORDS
    return chunk // per_row, (chunk % per_row) * CHUNK_WORDS


def metadata_chunk(chunk, sched: TensorCoreSchedule):
    """(step, tile column) of one 16-byte copy of the metadata tile: 32-bit words (step, column) of
    the packed metadata seen as (K/32, N) words (its memory order)."""
    per_step = sched.block_rows // CHUNK_WORDS
    return chunk // per_step, (chunk % per_step) * CHUNK_WORDS


def copy_counts(sched: TensorCoreSchedule) -> tuple[int, int, int]:
    """16-byte copies per pipeline step of the value, x and metadata tiles."""
    return (sched.block_rows * sched.a_words // CHUNK_WORDS, sched.block_tokens * sched.x_words // CHUNK_WORDS,
            sched.k_steps * sched.block_rows // CHUNK_WORDS)


def tensor_core_linear(tokens: int, n_out: int, k: int, has_bias: bool, name: str,
                       schedule: TensorCoreSchedule | None = None, dtype: str = "float16"):
    """The CUDA kernel (a ``tvm.tirx.PrimFunc`` with its thread bindings) of y = x @ W.T (+ b) for a
    2:4 weight (n_out, k) packed by ``pack_2_4``; parameters ``x (T, K) dtype, values (N, K/2)
    dtype, metadata (N, K/16) int16, [bias (N) f32], y (T, N) f32``."""
    if dtype not in MMA_SP:
        raise ValueError(f"sparse tensor-core linear: values must be float16 or bfloat16, not {dtype!r}")
    sched = schedule or tensor_core_schedule(tokens, n_out, k)
    check_shape(n_out, k)
    if n_out % sched.block_rows or k % sched.block_k:
        raise ValueError(f"{sched.describe()} does not tile a {n_out}x{k} weight")
    func = _build(tokens, n_out, k, has_bias, sched, dtype)
    if not has_bias:
        func = drop_param(func, "bias")
    return finish(func, name, sched.describe())


def _build(tokens: int, n_out: int, k: int, has_bias: bool, sched: TensorCoreSchedule, dtype: str):
    from tvm.script import tirx as T

    rows, toks, stages, k_steps = sched.block_rows, sched.block_tokens, sched.stages, sched.k_steps
    a_words, x_words = sched.a_words, sched.x_words
    n_a, n_x, n_e = copy_counts(sched)
    threads = sched.threads
    k_tiles = k // sched.block_k
    n_frag = sched.warp_tokens // MMA_N
    mma_sp = T.ptx[MMA_SP[dtype]]
    cp_async = T.ptx["cp.async.cg.shared.global"]
    half_words = k // 2  # stored values per weight row
    meta_words = k // 32  # 32-bit metadata words per weight row (memory order (K/32, N))

    @T.macro
    def copy_tiles(x, values, meta32, a_s, x_s, e_s, tid, block_row0, token0, k_tile, stage):
        for c in T.serial(ceil_div(n_a, threads)):
            if c * threads + tid < n_a:
                row, word = T.meta_var(value_chunk(c * threads + tid, sched))
                cp_async(a_s.ptr_to([stage, row, swizzle(row, word, a_words)]),
                         values.ptr_to([block_row0 + row, k_tile * (sched.block_k // 2) + 2 * word]), 16)
        for c in T.serial(ceil_div(n_x, threads)):
            if c * threads + tid < n_x:
                tok, word = T.meta_var(x_chunk(c * threads + tid, sched))
                cp_async(x_s.ptr_to([stage, tok, swizzle(tok, word, x_words)]),
                         x.ptr_to([T.min(token0 + tok, tokens - 1), k_tile * sched.block_k + 2 * word]), 16)
        for c in T.serial(ceil_div(n_e, threads)):
            if c * threads + tid < n_e:
                step, col = T.meta_var(metadata_chunk(c * threads + tid, sched))
                cp_async(e_s.ptr_to([stage, step, col]),
                         meta32.ptr_to([(k_tile * k_steps + step) * n_out + block_row0 + col]), 16)
        T.ptx["cp.async.commit_group"]()

    @T.macro
    def mma_step(acc, a_s, x_s, stage, lane, warp_row0, warp_tok0, step, e):
        # both 16-row halves' A fragments once, then each 8-token B fragment once for both halves
        a = T.decl_buffer((2, 4), "uint32", scope="local")
        b = T.decl_buffer((4,), "uint32", scope="local")
        for half, r in T.grid(2, 4):
            row, word = T.meta_var(a_fragment(lane, warp_row0 + 16 * half, step, r))
            a[half, r] = a_s[stage, row, swizzle(row, word, a_words)]
        for f in T.unroll(n_frag):
            for j in T.unroll(4):
                tok, word = T.meta_var(b_fragment(lane, warp_tok0 + 8 * f, step, j))
                b[j] = x_s[stage, tok, swizzle(tok, word, x_words)]
            mma_sp(acc[0, f, 0], acc[0, f, 1], acc[0, f, 2], acc[0, f, 3],
                   a[0, 0], a[0, 1], a[0, 2], a[0, 3], b[0], b[1], b[2], b[3],
                   acc[0, f, 0], acc[0, f, 1], acc[0, f, 2], acc[0, f, 3], e[0], 0)
            mma_sp(acc[1, f, 0], acc[1, f, 1], acc[1, f, 2], acc[1, f, 3],
                   a[1, 0], a[1, 1], a[1, 2], a[1, 3], b[0], b[1], b[2], b[3],
                   acc[1, f, 0], acc[1, f, 1], acc[1, f, 2], acc[1, f, 3], e[0], 1)

    @T.prim_func
    def kernel(x: T.Buffer((tokens, k), dtype), values: T.Buffer((n_out, half_words), dtype),
               metadata: T.Buffer((n_out, k // 16), "int16"), bias: T.Buffer((n_out,), "float32"),
               y: T.Buffer((tokens, n_out), "float32")):
        meta32 = T.decl_buffer((meta_words * n_out,), "uint32", data=metadata.data)
        for bx in T.thread_binding(n_out // rows, thread="blockIdx.x"):
            for by in T.thread_binding(ceil_div(tokens, toks), thread="blockIdx.y"):
                for tid in T.thread_binding(threads, thread="threadIdx.x"):
                    a_s = T.decl_buffer((stages, rows, a_words), "uint32", scope="shared")
                    x_s = T.decl_buffer((stages, toks, x_words), "uint32", scope="shared")
                    e_s = T.decl_buffer((stages, k_steps, rows), "uint32", scope="shared")
                    acc = T.decl_buffer((2, n_frag, 4), "float32", scope="local")
                    e = T.decl_buffer((1,), "uint32", scope="local")
                    lane = T.meta_var(tid % 32)
                    warp_row0 = T.meta_var((tid // 32) % sched.warps_m * 32)
                    warp_tok0 = T.meta_var((tid // 32) // sched.warps_m * sched.warp_tokens)
                    for h, f, i in T.grid(2, n_frag, 4):
                        acc[h, f, i] = T.float32(0)
                    # fill the pipeline: the first stages - 1 steps are in flight before any math
                    for s in T.serial(stages - 1):
                        if s < k_tiles:
                            copy_tiles(x, values, meta32, a_s, x_s, e_s, tid, bx * rows, by * toks, s, s)
                        else:
                            # one group per prologue slot, empty or not, so that wait_group(stages - 1)
                            # in the loop always retires the group of the step about to be read
                            T.ptx["cp.async.commit_group"]()
                    for kt in T.serial(k_tiles):
                        if kt + stages - 1 < k_tiles:
                            copy_tiles(x, values, meta32, a_s, x_s, e_s, tid, bx * rows, by * toks,
                                       kt + stages - 1, (kt + stages - 1) % stages)
                        else:
                            # nothing new to copy: commit an empty group so the wait count holds
                            T.ptx["cp.async.commit_group"]()
                        T.ptx["cp.async.wait_group"](stages - 1)
                        T.tvm_storage_sync("shared")
                        for step in T.unroll(k_steps):
                            step_, col = T.meta_var(metadata_word(lane, warp_row0, step))
                            e[0] = e_s[kt % stages, step_, col]
                            mma_step(acc, a_s, x_s, kt % stages, lane, warp_row0, warp_tok0, step, e)
                        # the next copy overwrites this stage: every warp must be done reading it
                        T.tvm_storage_sync("shared")
                    for h, f, i in T.grid(2, n_frag, 4):
                        row, tok = T.meta_var(c_fragment(lane, bx * rows + warp_row0 + 16 * h,
                                                         by * toks + warp_tok0 + 8 * f, i))
                        if tok < tokens:
                            if has_bias:
                                y[tok, row] = acc[h, f, i] + bias[row]
                            else:
                                y[tok, row] = acc[h, f, i]

    return kernel
