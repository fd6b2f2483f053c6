"""The error of the evaluation: it cannot run as configured (shared by eval.testset, eval.scoring, eval.report)."""
from __future__ import annotations

from cycle.errors import UserError

__all__ = ["EvaluationError"]


class EvaluationError(UserError, RuntimeError):
    """Evaluation cannot run as configured; the message says what to change."""
