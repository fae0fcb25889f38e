"""Split-conformal thresholds that bound a guard's over-refusal (pure Python, no numpy).

The guarantee. Let S_1, ..., S_n be a guard's scores on n benign calibration prompts and S the
score of a new benign prompt, and assume the n + 1 scores are exchangeable (for instance, the
prompts are drawn independently from the same distribution of benign prompts; a new suite of
another kind of prompt breaks it). Take k = ceil((n + 1)(1 - A)) and t = S_(k), the k-th
smallest calibration score. Then, for the guards' rule "refuse when score > threshold",

    P(S > t) <= 1 - k / (n + 1) <= A,

the probability taken over the calibration draw and the new prompt together (a marginal
bound: one calibration run may land above A, the average over calibration runs does not).
Why: S <= S_(k) whenever S's rank among the n + 1 scores is at most k, and by exchangeability
that rank is uniform on 1..n+1 (ties only raise the chance that S <= S_(k), so ties keep the
bound). Without ties it is tight to within 1 / (n + 1): P(S > t) >= A - 1 / (n + 1).

Mondrian (per category): the same recipe inside each category with that category's own n,
so that P(S > t_c | category c) <= A for a new prompt of category c.

The bound needs k <= n, i.e. n >= (1 - A) / A: `min_calibration_size`. A is read as the
decimal it was written as (0.1 is 1/10, not the nearest binary float), so the rank is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction


def exact(alpha: float) -> Fraction:
    """A as the decimal it was written as (0.1 -> 1/10), so ceil() sees no float error."""
    return Fraction(repr(float(alpha)))


def conformal_rank(n: int, alpha: float) -> int:
    """k = ceil((n + 1)(1 - A)): which order statistic of n calibration scores is the threshold."""
    return math.ceil((n + 1) * (1 - exact(alpha)))


def min_calibration_size(alpha: float) -> int:
    """The least n with conformal_rank(n, A) <= n: ceil((1 - A) / A) benign prompts."""
    a = exact(alpha)
    return max(1, math.ceil((1 - a) / a))


def conformal_threshold(scores: Sequence[float], alpha: float) -> tuple[float, int]:
    """(t, k): the k-th smallest score, k = ceil((n + 1)(1 - A)). Refusing score > t keeps a new
    exchangeable benign prompt's refusal probability <= A (module docstring). Raises ValueError
    when there are fewer than `min_calibration_size(A)` scores (callers say so to the user)."""
    if not 0 < alpha < 1:
        raise ValueError(f"A must be in (0, 1), got {alpha}")
    n = len(scores)
    k = conformal_rank(n, alpha)
    if n == 0 or k > n:
        raise ValueError(f"need at least {min_calibration_size(alpha)} scores, got {n}")
    return sorted(scores)[k - 1], k
