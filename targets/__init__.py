"""sparsecc.targets: target records, TVM kernels and runners. All TVM imports live here
(and in the lowering pass), so TVM's API churn is absorbed in one place."""

from .base import Capabilities, TargetRecord
from .registry import all_targets, get_target, register

__all__ = ["Capabilities", "TargetRecord", "all_targets", "get_target", "register"]
