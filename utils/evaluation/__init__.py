"""The evaluation layer: one run (load, fit, score, metrics, save) for images and volumes, its
metrics, report and figures."""

from .run import Run, run_evaluation, run_fit

__all__ = ["Run", "run_evaluation", "run_fit"]
