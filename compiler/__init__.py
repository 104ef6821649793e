"""sparsecc: a hardware-aware sparsity compiler for PyTorch.

Capture a model with ``torch.export``, calibrate on sample data, prune to a pattern the target's
kernels run fast, rewrite the graph into explicit sparse ops, and lower to TVM-generated kernels.

    artifact = sparsecc.compile(model, (x,), target="x86", sparsity=0.7, pattern="block16x1",
                                calibration=[(x1,), (x2,)])
    y = artifact(x)
    artifact.save("out/")
    again = sparsecc.load("out/")
"""

from . import ops  # noqa: F401 - registers the sparse ops with torch
from .api import compile, default_pipeline, search_plan
from .artifact import Artifact, load
from .capture import capture, from_exported, load_program
from .cost_check import check_cost_model
from .errors import SparseccError
from .gradual import GradualPruner
from .pass_manager import (
    Diagnostic,
    Instrument,
    NumericsInstrument,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    SnapshotInstrument,
    TimingInstrument,
    VerifyInstrument,
    all_passes,
    get_pass,
    parse_pipeline,
    register_pass,
)
from .plan import LayerPlan, Plan
from .program import Program, SparsityInfo

__version__ = "0.1.0"

__all__ = [
    "Artifact", "Diagnostic", "GradualPruner", "Instrument", "LayerPlan", "NumericsInstrument", "Pass", "PassContext",
    "PassManager", "PassResult", "Plan", "Program", "SnapshotInstrument", "SparseccError", "SparsityInfo",
    "TimingInstrument", "VerifyInstrument", "all_passes", "capture", "check_cost_model", "compile",
    "default_pipeline", "from_exported", "get_pass", "load", "load_program", "parse_pipeline", "register_pass",
    "search_plan",
]
