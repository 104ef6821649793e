"""The exception types sparsecc raises. Every message names the problem and the fix."""

from __future__ import annotations


class SparseccError(Exception):
    """Base of every error sparsecc raises on bad input or a broken artifact."""


class CaptureError(SparseccError):
    """The model could not be captured with torch.export."""


class CalibrationError(SparseccError):
    """Calibration inputs do not fit the captured program."""


class WeightError(SparseccError):
    """A weight holds NaN/inf or otherwise cannot be pruned."""


class TargetError(SparseccError):
    """Unknown target, or a request the target cannot serve."""


class PipelineError(SparseccError):
    """A pipeline string that does not parse, or a pass that is unknown."""


class ArtifactError(SparseccError):
    """An artifact folder that is missing, damaged, or from an incompatible version."""


class VerificationError(SparseccError):
    """A program that breaks an invariant a pass relies on."""
