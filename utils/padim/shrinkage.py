"""Covariance shrinkage (Ledoit-Wolf) for the streaming statistics of :mod:`utils.padim.gaussian`.

``covariance_shrinkage: ledoit_wolf`` shrinks each position's covariance toward a multiple of the
identity with the Ledoit-Wolf coefficient, computed from streaming sums (no second pass over
the images). Measured on the study's data it lowered every metric (docs/quality.md); it is kept
as an option, tested against scikit-learn.
"""

from __future__ import annotations

import torch

from ..errors import DataError
from .gaussian import GaussianStatistics


def shrink_ledoit_wolf(stats: GaussianStatistics) -> torch.Tensor:
    """Shrink every position's scatter in place, ``scatter <- (1 - a) scatter + a (tr scatter / d) I``,
    by its Ledoit-Wolf coefficient ``a``; returns the ``(P,)`` coefficients in [0, 1], as
    ``sklearn.covariance.ledoit_wolf_shrinkage`` computes them on each position's samples (centred,
    biased covariance ``S = scatter / n``; ``sum_k ||x_k - mean||^4`` from ``stats.moments``)::

        mu = tr S / d,  delta = ||S - mu I||_F^2 / d,
        beta = min(delta, (sum_k ||x_k - mean||^4 / n - ||S||_F^2) / (d n)),  a = beta / delta
    """
    moments = stats.moments
    held = 0 if moments is None else moments.count
    if held != stats.count or not held:
        raise DataError(
            f"Ledoit-Wolf shrinkage needs the moments of all {stats.count} training samples, but they hold {held}: "
            "covariance_shrinkage ledoit_wolf is supported in single-process fits (accumulate() or fit()) only"
        )
    n, dim = stats.count, stats.mean.shape[1]
    u = stats.mean - moments.shift  # (P, d) float64
    trace, frobenius, quadratic = (torch.empty(len(u), dtype=torch.float64, device=u.device) for _ in range(3))
    for start in range(0, len(u), 64):  # 64 positions at a time bounds the float64 temporaries
        block = stats.scatter[start : start + 64].double()
        part = u[start : start + 64]
        quadratic[start : start + 64] = torch.einsum("pi,pij,pj->p", part, block, part)
        block = block / n
        trace[start : start + 64] = block.diagonal(dim1=1, dim2=2).sum(dim=1)
        frobenius[start : start + 64] = block.square().sum(dim=(1, 2))
    c = u.square().sum(dim=1)  # sum_k ||x_k - mean||^4 by the expansion of utils.padim.gaussian.FourthMoments
    fourth = (moments.sum_a2 - 4 * (u * moments.sum_ay).sum(dim=1) + 4 * quadratic + 2 * c * moments.sum_a
              + n * c.square())
    delta = (frobenius - trace.square() / dim) / dim
    beta = (fourth / n - frobenius) / (dim * n)
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(beta > 0, beta / torch.where(delta > 0, delta, torch.ones_like(delta)), 0.0)
    diagonal = stats.scatter.diagonal(dim1=1, dim2=2)
    target = diagonal.double().sum(dim=1) / dim
    stats.scatter.mul_((1 - shrinkage).to(stats.scatter.dtype).view(-1, 1, 1))
    diagonal.add_((shrinkage * target).to(stats.scatter.dtype).unsqueeze(1))
    return shrinkage
