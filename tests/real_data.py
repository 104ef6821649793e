"""Skip-or-fail helpers for tests on real models and real text: outside CI a missing package
skips the test with the install command; under ``CI=true`` it fails (CI installs everything)."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def smollm_or_skip():
    """The ``sparsecc.zoo.smollm`` module, once its weights and GGUF reader are known present."""
    from sparsecc.zoo import smollm

    try:
        smollm.gguf_path()
        import gguf  # noqa: F401
    except (smollm.SmolLMError, ImportError) as exc:
        if IN_CI:
            pytest.fail(f"CI must run the SmolLM2 checks: {exc}")
        pytest.skip(str(exc))
    return smollm


def docs_or_skip():
    """The ``sparsecc.zoo.pydocs`` module, once the Python documentation text is known present."""
    from sparsecc.zoo import pydocs

    try:
        pydocs.docs_folder("library")
        pydocs.docs_folder("tutorial")
    except pydocs.DocsMissingError as exc:
        if IN_CI:
            pytest.fail(f"CI must run the real-text pruning checks: {exc}")
        pytest.skip(str(exc))
    return pydocs


def mobilenet_or_skip():
    """The ``sparsecc.zoo.mobilenet`` module, once the pretrained weights are known present."""
    from sparsecc.zoo import mobilenet

    try:
        mobilenet.weights_path()
    except mobilenet.MobileNetError as exc:
        if IN_CI:
            pytest.fail(f"CI must run the MobileNetV2 checks: {exc}")
        pytest.skip(str(exc))
    return mobilenet


def minilm_or_skip():
    """The ``sparsecc.zoo.minilm`` module, once all-MiniLM-L6-v2 is known installed."""
    from sparsecc.zoo import minilm

    if not minilm.minilm_available():
        message = f"all-MiniLM-L6-v2 is not installed: {minilm.INSTALL_COMMAND}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return minilm
