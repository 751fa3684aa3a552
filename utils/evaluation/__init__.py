"""The evaluation layer: one run (load, fit, score, metrics, save) for images and volumes, its
metrics, report and figures."""

from __future__ import annotations

from typing import Optional

from ..config import Settings
from ..padim import Padim
from .run import Evaluation, run_directory, run_fit, run_name
from .volumes import VolumeEvaluation


def evaluation_for(settings: Settings):
    """The evaluation of ``settings``' data format: :class:`Evaluation`, or for NIfTI volumes
    :class:`utils.volume_evaluation.VolumeEvaluation` (the same steps, per-volume results)."""
    if settings.data.format == "nifti":
        return VolumeEvaluation(settings)
    return Evaluation(settings)


def run_evaluation(settings: Settings, model_path: Optional[str] = None, progress: bool = True,
                   model: Optional[Padim] = None, figures: bool = True, save_model: bool = True, maps: bool = True):
    """Fit (or load ``model_path``, or use ``model``), score every test group, compute the metrics
    table and write ``results/<run-name>/``: what ``python -m utils evaluate`` and the notebook do.
    ``maps`` (NIfTI volumes only): write each test volume's anomaly map."""
    evaluation = evaluation_for(settings)
    evaluation.load_data()
    if model is not None:
        evaluation.fit(progress=progress, model=model)
    else:
        evaluation.fit(progress=progress, model_path=model_path)
    evaluation.score(progress=progress)
    evaluation.compute_metrics()
    options = {"maps": maps} if settings.data.format == "nifti" else {}
    evaluation.save(save_model=save_model, figures=figures, **options)
    return evaluation
