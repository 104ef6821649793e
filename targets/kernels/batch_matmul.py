"""Batched matrix multiply of two activations, c[b] = a[b] @ bm[b] (attention's q.k^T and p.v).

Neither operand is a stored weight, so nothing can be pre-packed: the kernel reads ``bm`` rows in
place. Each batch entry (batch x heads, flattened) is one parallel task; within it a register tile
of ``mr`` rows of ``a`` x ``nr`` columns of ``bm`` (whole vectors) accumulates over K, broadcasting
one ``a`` element per row and loading one contiguous vector of ``bm`` per step. Column tails use a
narrower vector; row tails a shorter tile.
"""

from __future__ import annotations

from sparsecc.targets.base import Capabilities

from ._common import ACC_SCOPE, finish, lanes


def batch_matmul_params(m: int, n: int, caps: Capabilities) -> tuple[int, int]:
    """(mr, nr): rows per register tile and columns per tile (a multiple of the vector width when
    N allows). About 12 accumulator vectors leaves room for the loaded and broadcast operands."""
    v = lanes(caps)
    if n >= 2 * v:
        return min(m, 6), 2 * v
    if n >= v:
        return min(m, 8), v
    return min(m, 8), n


def batch_matmul(batch: int, m: int, k: int, n: int, caps: Capabilities, name: str = "batch_matmul"):
    """Scheduled TIR PrimFunc: a (batch, m, k) f32, bm (batch, k, n) f32 -> c (batch, m, n) f32."""
    from tvm.script import tirx as T

    mr, nr = batch_matmul_params(m, n, caps)
    full_n, tail_n = divmod(n, nr)
    full_m, tail_m = divmod(m, mr)

    @T.macro
    def tile(a, bm, c, bb, m0, rows, n0, cols):
        acc = T.decl_buffer((rows, cols), "float32", scope=ACC_SCOPE)
        for mm in T.unroll(rows):
            for i in T.vectorized(cols):
                acc[mm, i] = T.float32(0)
        for kk in range(k):
            for mm in T.unroll(rows):
                for i in T.vectorized(cols):
                    acc[mm, i] = acc[mm, i] + a[bb, m0 + mm, kk] * bm[bb, kk, n0 + i]
        for mm in T.unroll(rows):
            for i in T.vectorized(cols):
                c[bb, m0 + mm, n0 + i] = acc[mm, i]

    @T.macro
    def strip(a, bm, c, bb, n0, cols):
        for mt in range(full_m):
            tile(a, bm, c, bb, mt * mr, mr, n0, cols)
        if tail_m > 0:
            tile(a, bm, c, bb, full_m * mr, tail_m, n0, cols)

    @T.prim_func
    def kernel(a: T.Buffer((batch, m, k), "float32"), bm: T.Buffer((batch, k, n), "float32"),
               c: T.Buffer((batch, m, n), "float32")):
        for bb in T.parallel(batch):
            for nb in range(full_n):
                strip(a, bm, c, bb, nb * nr, nr)
            if tail_n > 0:
                strip(a, bm, c, bb, full_n * nr, tail_n)

    return finish(kernel, name, f"batch-matmul parallel(batch={batch}) mr{mr} nr{nr}")
