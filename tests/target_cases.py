"""What the tests of targets whose kernels run outside this process (``wasm-simd`` in wasmtime,
``arm-neon`` under qemu) share: the toolchain gate (skip on a user's machine, fail in CI), and
the kernel cases, each a built PrimFunc with its inputs and float64 masked-dense reference: every
packed format at ordinary and awkward shapes (K not a multiple of the block or vector, M = 3, an
empty row, a fully dense row, rows with one nonzero at either end)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from kernel_check import awkward_rows, check_close, reference
from sparsecc.errors import ArtifactError
from sparsecc.sparsity import pack_bsr, pack_csr, pack_nm, parse_pattern
from sparsecc.targets import Capabilities, TargetRecord, all_targets
from sparsecc.targets.kernels import dense_args, dense_linear, sparse_kernel
from sparsecc.targets.kernels.bsr import bsr_args, bsr_linear, bsr_schedules
from sparsecc.targets.kernels.csr import csr_args, csr_linear, csr_schedules
from sparsecc.targets.kernels.dense import dense_schedules
from sparsecc.targets.kernels.nm import nm_args, nm_linear, nm_schedules

MS = [1, 3, 8, 32]
#: the formats of the vector-instruction checks
SIMD_FORMATS = ["dense", "csr", "bsr16x1", "bsr4x4", "2:4"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require(lacking: list[str], what: str) -> None:
    """Skip when tools are missing, except in CI (``CI=true``), where a missing toolchain is a
    broken CI image and must fail loudly instead of passing as a skip."""
    if not lacking:
        return
    message = f"{what} is missing: {', '.join(lacking)}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing toolchain fails instead of skipping; .ci/run installs it)")
    pytest.skip(message)


@dataclasses.dataclass
class Case:
    """One kernel to build and run: ``func(*inputs, y)`` with ``y`` of shape (m, n_out) should
    equal ``ref``."""

    func: Any
    inputs: list[np.ndarray]
    m: int
    n_out: int
    ref: np.ndarray

    @property
    def name(self) -> str:
        return str(self.func.attrs["global_symbol"])

    @property
    def schedule(self) -> str:
        return str(self.func.attrs["sparsecc.schedule"])


def folder_fixture(require_toolchain, name: str):
    """A module-scoped ``folder`` fixture: a fresh folder for built kernels, after the
    toolchain gate (``require_toolchain()`` skips, or fails in CI, when tools are missing)."""

    @pytest.fixture(scope="module")
    def folder(tmp_path_factory):
        require_toolchain()
        return tmp_path_factory.mktemp(name)

    return folder


def check_case(build_and_run, folder, case: Case) -> Any:
    """Build and run ``case`` with a target's ``build_and_run(func, inputs, m, n_out, folder)``,
    compare with the reference, return the built file's path."""
    got, path = build_and_run(case.func, case.inputs, case.m, case.n_out, folder)
    check_close(got, case.ref)
    return path


def check_record(target: TargetRecord, triple: str, mattr: str, runner: str) -> None:
    """What every 128-bit out-of-process target record says: registered, 4 f32 lanes on one
    thread, an LLVM target dict TVM accepts, its runner, whole models built as static programs
    (a ``link_model``), packed patterns."""
    import tvm

    assert target in all_targets()
    caps = target.capabilities()
    assert caps.vector_bits == 128 and caps.vector_lanes_f32 == 4 and caps.threads == 1
    tgt = target.tvm_target()
    assert tgt["kind"] == "llvm" and tgt["mtriple"].startswith(triple) and mattr in tgt["mattr"]
    tvm.target.Target(tgt)  # TVM accepts it
    assert target.runner == runner and target.builds_models and target.link_model is not None
    target.require_model_build()
    assert target.supports(target.default_pattern)
    for name in target.patterns:
        assert parse_pattern(name).packed_format in ("csr", "bsr", "nm"), name


def check_missing_model_refused(target: TargetRecord, tmp_path, message: str) -> None:
    """The runner's ``load`` refuses a model file that is not there, saying so."""
    from sparsecc.targets.runners import load_library

    with pytest.raises(ArtifactError, match=message):
        load_library(target.runner, tmp_path / "model.bin")


def listing_line(target: TargetRecord, capsys) -> str:
    """The line ``sparsecc targets`` prints for ``target``; it does not call the target
    kernels-only and says whether the target runs here."""
    from sparsecc import cli

    assert cli.main(["targets"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(target.name))
    assert "no whole-model build yet" not in line
    assert ("runs here" in line) == target.runs_here
    return line


def _x_bias(rng, m: int, n_out: int, k: int, with_bias: bool):
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32) if with_bias else None
    return x, bias


def _sparse_case(m: int, w: np.ndarray, packed, with_bias: bool, rng, caps: Capabilities, name: str) -> Case:
    n_out, k = w.shape
    x, bias = _x_bias(rng, m, n_out, k, with_bias)
    func, arrays = sparse_kernel(m, packed, with_bias, caps, name)
    return Case(func, [x, *arrays] + ([bias] if with_bias else []), m, n_out, reference(x, w, bias))


def dense_case(m: int, shape: tuple[int, int], caps: Capabilities) -> Case:
    rng = np.random.default_rng(m * 7 + shape[1])
    n_out, k = shape
    w = rng.standard_normal(shape).astype(np.float32)
    x, bias = _x_bias(rng, m, n_out, k, m != 3)
    func = dense_linear(m, shape, bias is not None, caps, f"dense_{m}_{n_out}")
    args = [x, *dense_args(w, m, caps)] + ([bias] if bias is not None else [])
    return Case(func, args, m, n_out, reference(x, w, bias))


def csr_case(m: int, shape: tuple[int, int], caps: Capabilities) -> Case:
    rng = np.random.default_rng(m * 11 + shape[0])
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < 0.7] = 0
    w = awkward_rows(w, rng)
    return _sparse_case(m, w, pack_csr(w), m % 2 == 0, rng, caps, f"csr_{m}_{shape[0]}")


def bsr_case(m: int, block: tuple[int, int], caps: Capabilities) -> Case:
    r, c = block
    rng = np.random.default_rng(m * 13 + r)
    n_out = 48
    k = 53 if c == 1 else 68  # K not a multiple of 16 (the kernels' strips) nor of the tile
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    keep = rng.random((n_out // r, k // c)) < 0.35
    keep[0] = False  # an empty block row
    keep[1] = True  # a fully dense block row
    w *= keep.repeat(r, 0).repeat(c, 1)
    return _sparse_case(m, w, pack_bsr(w, block), m != 3, rng, caps, f"bsr{r}x{c}_{m}")


def nm_case(m: int, n_out: int, caps: Capabilities) -> Case:
    rng = np.random.default_rng(m * 17 + n_out)
    k = 68
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    groups = w.reshape(n_out, k // 4, 4)
    order = np.argsort(rng.random(groups.shape), axis=2)
    groups[order >= 2] = 0
    w = groups.reshape(n_out, k)
    w[0, :4] = 0  # a group with no nonzeros (padded slots)
    w[3] = 0  # an all-zero row
    return _sparse_case(m, w, pack_nm(w, 2, 4), m != 1, rng, caps, f"nm_{m}_{n_out}")


def simd_case(fmt: str, m: int, caps: Capabilities) -> Case:
    """A 48x64 kernel of format ``fmt`` (one of :data:`SIMD_FORMATS`), named ``simd_<fmt>_<m>``."""
    rng = np.random.default_rng(5)
    n_out, k = 48, 64
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    name = f"simd_{fmt.replace(':', '_')}_{m}"
    if fmt == "dense":
        func, arrays = dense_linear(m, (n_out, k), False, caps, name), dense_args(w, m, caps)
    else:
        if fmt == "csr":
            w[rng.random(w.shape) < 0.7] = 0
            packed = pack_csr(w)
        elif fmt == "2:4":
            groups = w.reshape(n_out, k // 4, 4)
            groups[np.argsort(rng.random(groups.shape), axis=2) >= 2] = 0
            w = groups.reshape(n_out, k)
            packed = pack_nm(w, 2, 4)
        else:
            r, c = {"bsr16x1": (16, 1), "bsr4x4": (4, 4)}[fmt]
            w *= (rng.random((n_out // r, k // c)) < 0.4).repeat(r, 0).repeat(c, 1)
            packed = pack_bsr(w, (r, c))
        func, arrays = sparse_kernel(m, packed, False, caps, name)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return Case(func, [x, *arrays], m, n_out, reference(x, w, None))


def candidate_cases(m: int, caps: Capabilities) -> Iterator[Case]:
    """Every candidate schedule of every format (the first four dense ones) on 48x68 weights."""
    rng = np.random.default_rng(m)
    n_out, k = 48, 68
    base = rng.standard_normal((n_out, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)

    def case(func, arrays, w):
        return Case(func, [x, *arrays], m, n_out, reference(x, w, None))

    for i, s in enumerate(dense_schedules(m, (n_out, k), caps)[:4]):
        yield case(dense_linear(m, (n_out, k), False, caps, f"cand_dense_{m}_{i}", schedule=s),
                   dense_args(base, m, caps, schedule=s), base)
    w = awkward_rows(np.where(rng.random(base.shape) < 0.7, 0, base).astype(np.float32), rng)
    packed = pack_csr(w)
    for i, s in enumerate(csr_schedules(m, packed, caps)):
        yield case(csr_linear(m, packed, False, caps, f"cand_csr_{m}_{i}", schedule=s),
                   csr_args(packed, m, caps, schedule=s), w)
    for block in ((16, 1), (4, 4)):
        keep = rng.random((n_out // block[0], k // block[1])) < 0.4
        wb = base * keep.repeat(block[0], 0).repeat(block[1], 1)
        pb = pack_bsr(wb, block)
        for i, s in enumerate(bsr_schedules(m, pb, caps)):
            yield case(bsr_linear(m, pb, False, caps, f"cand_bsr{block[0]}_{m}_{i}", schedule=s),
                       bsr_args(pb, m, caps, schedule=s), wb)
    groups = base.copy().reshape(n_out, k // 4, 4)
    groups[np.argsort(rng.random(groups.shape), axis=2) >= 2] = 0
    wn = groups.reshape(n_out, k)
    pn = pack_nm(wn, 2, 4)
    for i, s in enumerate(nm_schedules(m, pn, caps)):
        yield case(nm_linear(m, pn, False, caps, f"cand_nm_{m}_{i}", schedule=s),
                   nm_args(pn, m, caps, schedule=s), wn)


class FormatTests:
    """Every packed format's kernels against the masked-dense product, for one target. A test
    module subclasses it as ``Test...`` with ``caps`` (the target's capabilities) and ``check``
    (build and run one :class:`Case` under the ``folder`` fixture, compare, return the built
    file's path); the subclass's module provides the ``folder`` fixture."""

    caps: Capabilities
    build_and_run: Any  # staticmethod(build_and_run) of the target's test helpers

    def check(self, folder, case: Case) -> Any:
        return check_case(self.build_and_run, folder, case)

    @pytest.mark.parametrize("m", MS)
    @pytest.mark.parametrize("shape", [(37, 53), (48, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
    def test_dense(self, folder, m: int, shape: tuple[int, int]) -> None:
        self.check(folder, dense_case(m, shape, self.caps))

    @pytest.mark.parametrize("m", MS + [131])
    @pytest.mark.parametrize("shape", [(37, 53), (48, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
    def test_csr(self, folder, m: int, shape: tuple[int, int]) -> None:
        case = csr_case(m, shape, self.caps)
        self.check(folder, case)
        # 4 lanes on both 128-bit targets: the row-gathering SpMV at M = 1
        assert case.schedule.startswith("csr-spmv gather4" if m == 1 else "csr-spmm")

    @pytest.mark.parametrize("m", MS)
    @pytest.mark.parametrize("block", [(16, 1), (8, 1), (4, 1), (2, 1), (4, 4)], ids=lambda b: f"{b[0]}x{b[1]}")
    def test_bsr(self, folder, m: int, block: tuple[int, int]) -> None:
        self.check(folder, bsr_case(m, block, self.caps))

    @pytest.mark.parametrize("m", MS)
    @pytest.mark.parametrize("n_out", [48, 20])
    def test_nm_2_4(self, folder, m: int, n_out: int) -> None:
        self.check(folder, nm_case(m, n_out, self.caps))

    @pytest.mark.slow
    @pytest.mark.parametrize("m", [1, 8])
    def test_every_candidate(self, folder, m: int) -> None:
        """Every candidate schedule (slow: about 40 builds)."""
        for case in candidate_cases(m, self.caps):
            self.check(folder, case)
