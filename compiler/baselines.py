"""Dense baselines sparsecc measures itself against: the same model in ONNX Runtime.

ONNX Runtime's dense kernels are the speed bar on CPUs (faster than torch eager on most
shapes), so every speed claim puts sparsecc beside it in the same run.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

# onnx writes a newer IR version than onnxruntime reads; 9 with opset 17 is accepted by both.
ONNX_IR_VERSION = 9
ONNX_OPSET = 17


def onnx_model(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> Any:
    """``model`` exported to ONNX (TorchScript exporter, fixed shapes, inputs named ``input0``...)
    at the opset and IR version ONNX Runtime and onnxruntime-web accept."""
    import onnx

    names = [f"input{i}" for i in range(len(example_inputs))]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(example_inputs), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=names)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = ONNX_IR_VERSION
    return proto


def onnxruntime_dense(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                      threads: int = 1, spinning: bool = True) -> Callable[..., list[torch.Tensor]]:
    """Export ``model`` to ONNX (TorchScript exporter, fixed shapes) and return a function that
    runs it in ONNX Runtime on the CPU with ``threads`` intra-op threads. ``spinning=False`` makes
    its idle workers sleep instead of spin-waiting, for timing it interleaved with another
    runtime whose threads must not find the cores busy."""
    import onnxruntime

    names = [f"input{i}" for i in range(len(example_inputs))]
    proto = onnx_model(model, example_inputs)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        feeds = {name: t.detach().contiguous().numpy() for name, t in zip(names, inputs, strict=True)}
        return [torch.from_numpy(out) for out in session.run(None, feeds)]

    return run
