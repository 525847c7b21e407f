"""Statistics over seeds: what a reader may conclude from a few runs that differ only in their seed.

The unit of replication is the seed. Clients of one run share its seed (its partition, its
initialisation, its batches), so they are not independent samples: a per-client metric is first
averaged within its seed (`seed_means`), and only the per-seed values enter an interval. Two methods
are compared by the difference PER SEED (paired: both ran on the same split and client randomness),
with a t interval on n_seeds - 1 degrees of freedom. An interval that covers 0 is "not significant",
and the tools say so in those words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean of per-seed values, its standard error and a two-sided t interval (None: fewer than 2 seeds)."""

    n: int
    mean: float
    se: float | None
    low: float | None
    high: float | None
    confidence: float = CONFIDENCE

    @property
    def df(self) -> int:
        return self.n - 1

    @property
    def significant(self) -> bool | None:
        """Whether the interval excludes 0 (None: no interval)."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0

    def verdict(self) -> str:
        """What the interval supports, in words a table cell can hold."""
        if self.significant is None:
            return f"{self.n} seed{'s' if self.n != 1 else ''}: no interval"
        return "significant" if self.significant else "not significant"

    def text(self, digits: int = 2, scale: float = 1.0) -> str:
        """'mean ± se (95% CI low to high)', values multiplied by `scale` (100 for percentages)."""
        mean = (
            f"{self.mean * scale:+.{digits}f}" if self.low is not None else f"{self.mean * scale:.{digits}f}"
        )
        if self.se is None or self.low is None or self.high is None:
            return mean
        pct = round(100 * self.confidence)
        return (
            f"{mean} ± {self.se * scale:.{digits}f} "
            f"({pct}% CI {self.low * scale:+.{digits}f} to {self.high * scale:+.{digits}f})"
        )


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, standard error (sample standard deviation / sqrt(n)) and the t interval of `values`."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarize")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("values to summarize must be finite numbers")
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(n, mean, None, None, None, confidence)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    return Summary(n, mean, se, mean - half, mean + half, confidence)


@dataclass(frozen=True)
class Paired:
    """Method a minus method b, per seed, and the summary of those differences."""

    by_seed: dict[int, float]
    summary: Summary


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE
) -> Paired:
    """a - b on every seed both have (a seed only one method ran on is left out, not imputed)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two methods share no seed: nothing to pair")
    diffs = {s: a[s] - b[s] for s in seeds}
    return Paired(diffs, summarize(list(diffs.values()), confidence))


def seed_means(per_client: Mapping[int, Mapping[int, float]]) -> dict[int, float]:
    """{seed: {client: value}} -> {seed: mean over its clients}: clients nested in their seed."""
    out = {}
    for seed, clients in per_client.items():
        if not clients:
            raise ValueError(f"seed {seed} has no client values")
        out[seed] = math.fsum(clients.values()) / len(clients)
    return out
