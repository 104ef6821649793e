"""Pruning methods on the real SmolLM2-135M and real text: a fast version of
``benchmarks/accuracy.py`` (few calibration samples, few evaluation windows)."""

from __future__ import annotations

import pytest
import sparsecc
from real_data import docs_or_skip, smollm_or_skip
from sparsecc.pass_manager import PassContext, PassManager
from sparsecc.targets import get_target


@pytest.mark.slow
@pytest.mark.models
def test_calibrated_methods_beat_magnitude_on_smollm_perplexity():
    pydocs, smollm = docs_or_skip(), smollm_or_skip()
    seq = 128
    model = smollm.load_smollm(max_seq=seq)
    tokenizer = smollm.load_tokenizer()
    windows = pydocs.evaluation_windows(tokenizer, 4, seq)
    calibration = [(s,) for s in pydocs.calibration_segments(tokenizer, 8, seq, seed=0)]
    program = sparsecc.capture(model, (windows[0],))
    dense = pydocs.perplexity(program.run, windows)
    assert 5 < dense < 40, f"dense perplexity {dense:.1f}: the model or the text is wrong"
    perplexity = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        ctx = PassContext(get_target("x86"), calibration=calibration, progress=False)
        result = PassManager(f"plan-uniform{{sparsity=0.5,pattern=unstructured}},prune-{method}").run(program, ctx)
        plan = result.program.plan
        # the LM head stays dense by the vocabulary-head rule; every decoder linear is pruned
        assert [lp.name for lp in plan.dense_layers()] == ["lm_head"]
        assert len(plan.sparse_layers()) == 30 * 7
        perplexity[method] = pydocs.perplexity(result.program.run, windows)
    # magnitude is over 10x dense here; the calibrated methods stay within a few x
    assert perplexity["magnitude"] > 8 * dense, perplexity
    for method in ("wanda", "sparsegpt"):
        assert perplexity[method] < 4 * dense and perplexity[method] < 0.3 * perplexity["magnitude"], perplexity
