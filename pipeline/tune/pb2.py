"""PB2's bandit (Parker-Holder et al. 2020): a Gaussian process over (hyperparameters, time) ->
improvement of the ranking score over a segment, and an upper-confidence-bound choice.

Inputs are the searched numbers scaled to [0, 1] (log-scaled where the range is) plus the segment
index scaled to [0, 1]; targets are standardised. The kernel is a squared exponential whose length
scale is the one of a small grid with the highest marginal likelihood. Several members choosing at
the same boundary are kept apart GP-BUCB style: each choice is added as a pseudo-observation at its
predicted mean (which shrinks the uncertainty there) before the next member chooses.
"""
from __future__ import annotations

import numpy as np

LENGTH_SCALES = (0.1, 0.2, 0.35, 0.5, 1.0)
NOISE = 0.1


def _kernel(a: np.ndarray, b: np.ndarray, ell: float) -> np.ndarray:
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.exp(-0.5 * d2 / ell ** 2)


class GP:
    """Zero-mean GP regression on standardised targets with a grid-fitted length scale."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = np.asarray(x, dtype=float)
        y = np.asarray(y, dtype=float)
        self.mu, self.sd = float(y.mean()), float(y.std()) or 1.0
        self.y = (y - self.mu) / self.sd
        self.ell = max(LENGTH_SCALES, key=self._log_likelihood)
        self._fit()

    def _chol(self, ell: float):
        k = _kernel(self.x, self.x, ell) + NOISE * np.eye(len(self.x))
        return np.linalg.cholesky(k)

    def _log_likelihood(self, ell: float) -> float:
        chol = self._chol(ell)
        alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, self.y))
        return float(-0.5 * self.y @ alpha - np.log(np.diag(chol)).sum())

    def _fit(self) -> None:
        self.chol = self._chol(self.ell)
        self.alpha = np.linalg.solve(self.chol.T, np.linalg.solve(self.chol, self.y))

    def predict(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (in standardised units) at ``xs``."""
        ks = _kernel(np.asarray(xs, dtype=float), self.x, self.ell)
        mean = ks @ self.alpha
        v = np.linalg.solve(self.chol, ks.T)
        var = np.clip(1.0 - (v ** 2).sum(0), 1e-12, None)
        return mean, np.sqrt(var)

    def add(self, x: np.ndarray, y_std: float) -> None:
        """A pseudo-observation (already standardised), keeping the length scale."""
        self.x = np.vstack([self.x, x[None, :]])
        self.y = np.append(self.y, y_std)
        self._fit()


def choose(x: np.ndarray, y: np.ndarray, candidates: np.ndarray, n: int, kappa: float) -> list[int]:
    """Indices of ``n`` candidate rows (inputs with the time column) maximising mean + kappa x std,
    one after the other with GP-BUCB pseudo-observations. Falls back to the first ``n`` candidates
    when there are too few observations to fit (fewer than 2)."""
    if len(x) < 2:
        return list(range(min(n, len(candidates))))
    gp = GP(x, y)
    picked: list[int] = []
    for _ in range(n):
        mean, sd = gp.predict(candidates)
        ucb = mean + kappa * sd
        ucb[picked] = -np.inf
        i = int(np.argmax(ucb))
        picked.append(i)
        gp.add(candidates[i], float(mean[i]))
    return picked
