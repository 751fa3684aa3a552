"""The method: backbones, patch embeddings, Gaussian statistics, scoring, alignment, the
:class:`Padim` estimator and its file. Depends on torch, numpy/scipy and the settings only.
"""

from .model import Padim, ScoreResult

__all__ = ["Padim", "ScoreResult"]
