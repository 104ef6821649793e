"""plan-uniform: give every layer the target can make sparse the same pattern and sparsity.

This is the planning stage before the per-layer search exists: one pattern and one sparsity for
all layers, and for every layer that must stay dense a reason the user sees. Rules (also in the
docs): a grouped convolution stays dense (no sparse kernel); a k x k, strided or padded one stays
dense unless ``convs=all`` (its sparse form reads im2col rows, see ``sparsecc.ops.im2col_rows``);
a language model's output head stays dense (a linear that produces a
program output directly and has at least 4x more outputs than inputs, a vocabulary projection:
every logit depends on it and no later layer makes up for its error, so both the SparseGPT and
the Wanda papers keep it dense); a weight the pattern cannot tile stays dense; a layer with fewer
than ``min_inputs`` inputs per output stays dense (pruning leaves too few weights per output to
keep accuracy, and the layer is too small for a sparse kernel to pay off); layers matching
``skip`` (fnmatch globs separated by ';') stay dense; a pattern the target lacks, or a sparsity
the pattern cannot have, is an error.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from sparsecc.errors import TargetError
from sparsecc.pass_manager import Pass, PassContext, PassResult, register_pass
from sparsecc.plan import LayerPlan, Plan
from sparsecc.program import Layer, Program
from sparsecc.sparsity import PatternError, check_sparsity_value, parse_pattern

#: which convolutions (of groups 1) a plan makes sparse: ``pointwise`` only the 1x1, stride 1,
#: unpadded ones (a permute away from a sparse GEMM), ``all`` every one (k x k, strided or padded
#: ones read their windows as im2col rows first)
CONV_CHOICES = ("pointwise", "all")


def dense_reason(layer: Layer, convs: str = "pointwise") -> str | None:
    """Why a layer's op does not become a sparse kernel, or None when it does."""
    if layer.kind == "linear":
        return None
    if layer.conv.get("groups", 1) != 1:
        return f"grouped convolution (groups={layer.conv['groups']}) has no sparse kernel; kept dense"
    if convs == "all" or layer.is_pointwise_conv:
        return None
    kh, kw = layer.weight_shape[2:]
    sh, sw = layer.conv.get("stride", (1, 1))
    what = f"{kh}x{kw} convolution" if (kh, kw) != (1, 1) else "strided or padded 1x1 convolution"
    return (f"{what}: kept dense (its sparse form first copies its input windows into im2col rows, "
            f"each input about {kh * kw / (sh * sw):.3g} times, which a one-shot pruned layer rarely repays; "
            "ask for it with convs=all, --convs all)")


#: ops that only change the shape or the memory layout of a tensor
_VIEW_OPS = {"view", "reshape", "_unsafe_view", "squeeze", "unsqueeze", "permute", "transpose", "contiguous",
             "clone", "alias", "flatten", "t"}


def vocabulary_heads(program: Program) -> set[str]:
    """Node names of the linears that are a language model's output head (see the module
    docstring): their result reaches a program output through shape-only ops, and they have at
    least 4x more outputs than inputs."""
    outputs = [n for n in program.graph.nodes if n.op == "output"]
    pending = list(outputs[0].all_input_nodes) if outputs else []
    feeding: set[str] = set()
    while pending:
        node = pending.pop()
        if node.name in feeding:
            continue
        feeding.add(node.name)
        op = getattr(node.target, "__name__", "").split(".")[0]
        if node.op == "call_function" and op in _VIEW_OPS:
            pending.extend(node.all_input_nodes)
    return {layer.node for layer in program.layers()
            if layer.kind == "linear" and layer.node in feeding
            and layer.matrix_shape[0] >= 4 * layer.matrix_shape[1]}


def layer_rows(program: Program, layer: Layer) -> int:
    """Rows the layer's GEMM sees (tokens of a linear, batch x pixels of a convolution): its
    output's elements over its output channels, from the exported graph's shapes."""
    node = program.node(layer.node)
    value = None if node is None else node.meta.get("val")
    if value is None or not hasattr(value, "numel"):
        return 1
    return max(1, int(value.numel()) // max(1, layer.matrix_shape[0]))


def kept_dense_reason(layer: Layer, heads: set[str], skips: list[str], convs: str) -> str | None:
    """Why a layer stays dense whatever the pattern (no sparse kernel for its op, a language
    model's output head, a skip pattern), or None. Shared by every planning pass."""
    reason = dense_reason(layer, convs)
    if reason is None and layer.node in heads:
        reason = (f"output head with {layer.matrix_shape[0]} outputs from {layer.matrix_shape[1]} inputs "
                  "(a vocabulary projection): every prediction depends on it and no later layer "
                  "corrects its error; kept dense")
    if reason is None and any(fnmatch.fnmatchcase(layer.name, s) for s in skips):
        reason = "matches a skip pattern; kept dense"
    return reason


def too_few_inputs(layer: Layer, min_inputs: int) -> str:
    return (f"only {layer.matrix_shape[1]} inputs per output (< min_inputs={min_inputs}): "
            "too few weights per output to prune and too little work to pay off; kept dense")


@register_pass
@dataclass(frozen=True)
class PlanUniform(Pass):
    """Uniform plan: the same pattern and sparsity for every layer that can take it."""

    name = "plan-uniform"
    summary = "plan one pattern and sparsity for every layer the target can make sparse"
    numerics = "exact"

    sparsity: float = 0.5
    pattern: str = ""  # empty: the target's default pattern
    method: str = "wanda"
    skip: str = ""
    min_inputs: int = 64
    convs: str = "pointwise"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        check_sparsity_value(self.sparsity)
        pattern_name = self.pattern or ctx.target.default_pattern
        pattern = parse_pattern(pattern_name)
        if not ctx.target.supports(pattern.name):
            raise TargetError(
                f"target {ctx.target.name!r} has no kernel for pattern {pattern.name!r}; "
                f"it supports: {', '.join(ctx.target.patterns)}")
        if (why := pattern.check_sparsity(self.sparsity)) is not None:
            raise PatternError(why)
        if self.convs not in CONV_CHOICES:
            raise ValueError(f"plan-uniform convs={self.convs!r}: choose one of {', '.join(CONV_CHOICES)}")
        skips = [s.strip() for s in self.skip.split(";") if s.strip()]
        plan = Plan(target=ctx.target.name, method=self.method)
        diagnostics = []
        heads = vocabulary_heads(program)
        # a target whose cost model can say that a layer does not pay as sparse (the GPU roofline)
        cost_model = ctx.target.cost_model() if ctx.target.cost_model is not None else None
        pays_check = getattr(cost_model, "dense_reason", None)
        for layer in program.layers():
            reason = kept_dense_reason(layer, heads, skips, self.convs)
            if reason is None and self.sparsity == 0.0:
                reason = "sparsity 0: dense build"
            if reason is None:
                reason = pattern.check_shape(layer.matrix_shape)
                if reason is not None:
                    reason += "; kept dense"
            if reason is None and pays_check is not None and self.sparsity > 0:
                reason = pays_check(layer_rows(program, layer), *layer.matrix_shape)
            if reason is None and layer.matrix_shape[1] < self.min_inputs:
                reason = too_few_inputs(layer, self.min_inputs)
            if reason is None:
                plan.layers[layer.name] = LayerPlan(layer.name, layer.kind, list(layer.matrix_shape),
                                                    pattern.name, float(self.sparsity))
            else:
                plan.layers[layer.name] = LayerPlan(layer.name, layer.kind, list(layer.matrix_shape),
                                                    None, 0.0, reason)
                if self.sparsity > 0:
                    diagnostics.append(self.diag("info", reason, layer.name))
        new = Program(program.exported, program.example_inputs, stage="planned", plan=plan,
                      sparsity=program.sparsity)
        return PassResult(new, changed=True,
                          counters={"sparse_layers": len(plan.sparse_layers()),
                                    "dense_layers": len(plan.dense_layers())},
                          diagnostics=diagnostics)
