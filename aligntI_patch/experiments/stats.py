"""Statistics of the report: mean and 95 % t interval over seeds, paired differences, the gap recovered.

Design choices
- Intervals are Student-t over seeds (each seed one independent training run); no scipy: the two-sided 95 %
  quantiles for 1..30 degrees of freedom are tabulated, beyond that a Cornish-Fisher expansion (error < 1e-3).
- One seed gives a mean and no interval (n=1), never an interval of zero width.
- Paired differences use the seeds both rows have (same seed: same data order and initial projector), which
  removes the seed-to-seed spread the rows share.
- The paired bootstrap resamples seeds and questions together (the same draws for both rows: each seed is one
  training run, each question one test item), so its interval holds both the training noise and the test set's
  finite size; with one seed it is the question noise alone, and says so.
- Gap recovered = (student - SFT) / (teacher - SFT), only where the teacher leads the SFT student by at least
  `MIN_TEACHER_LEAD` points: below that the denominator is noise and the ratio carries no signal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# t_{0.975}(df) for df = 1..30 (two-sided 95 %)
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z975 = 1.959964
MIN_TEACHER_LEAD = 10.0  # accuracy points


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975  # Cornish-Fisher expansion of t around the normal quantile
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Estimate:
    """A mean over n seeds and the half-width of its 95 % interval (None when n < 2)."""

    mean: float
    half: float | None
    n: int

    @property
    def interval(self) -> tuple[float, float] | None:
        return None if self.half is None else (self.mean - self.half, self.mean + self.half)

    def sign(self) -> str:
        """'+' / '-' when the interval excludes 0 on that side, '?' when it spans 0, 'n=1' without one."""
        if self.interval is None:
            return f"n={self.n}"
        low, high = self.interval
        return "+" if low > 0 else "-" if high < 0 else "?"

    def format(self, digits: int = 1) -> str:
        if self.half is None:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"


def mean_interval(values: Sequence[float]) -> Estimate:
    """Mean and 95 % t half-width s * t_{0.975}(n-1) / sqrt(n) of `values` (one per seed)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, None, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean, t_quantile_975(n - 1) * sd / math.sqrt(n), n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Estimate | None:
    """Mean and 95 % interval of a[seed] - b[seed] over the seeds both have (None if there are none)."""
    seeds = sorted(set(a) & set(b))
    return mean_interval([a[s] - b[s] for s in seeds]) if seeds else None


def gap_recovered(student: float, sft: float, teacher: float, min_lead: float = MIN_TEACHER_LEAD) -> float | None:
    """(student - sft) / (teacher - sft), or None where the teacher leads SFT by less than `min_lead` points."""
    lead = teacher - sft
    if lead < min_lead:
        return None
    return (student - sft) / lead


@dataclass(frozen=True)
class Bootstrap:
    """Mean difference (accuracy points) and its 95 % percentile interval over `n_seeds` x `n_questions`."""

    mean: float
    low: float
    high: float
    n_seeds: int
    n_questions: int

    def sign(self) -> str:
        return "+" if self.low > 0 else "-" if self.high < 0 else "?"

    def format(self, digits: int = 1) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def paired_bootstrap(a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]],
                     n_boot: int = 2000, seed: int = 0) -> Bootstrap | None:
    """a - b in points, a[seed][question] and b[seed][question] the per-question scores in [0, 1]: the seeds
    both have and the questions every one of them scored; each draw resamples seeds and questions with
    replacement, paired (None when nothing is shared)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    questions = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    if not questions:
        return None
    diff = 100 * np.array([[a[s][q] - b[s][q] for q in questions] for s in seeds])  # (S, Q)
    rng = np.random.default_rng(seed)
    n_s, n_q = diff.shape
    draws = np.empty(n_boot)
    for i in range(n_boot):
        rows = rng.integers(0, n_s, n_s)
        cols = rng.integers(0, n_q, n_q)
        draws[i] = diff[np.ix_(rows, cols)].mean()
    low, high = np.percentile(draws, [2.5, 97.5])
    return Bootstrap(float(diff.mean()), float(low), float(high), n_s, n_q)
