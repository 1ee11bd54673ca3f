"""Confidence intervals for sampled shares and for means of a few windows.

No SciPy: the normal quantile comes from the standard library, Student's t
quantile from its CDF (the regularized incomplete beta function, by Lentz's
continued fraction) inverted by bisection -- a few windows need t with 2..9
degrees of freedom, where the normal quantile is far too optimistic.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def z_quantile(confidence: float) -> float:
    """The two-sided normal critical value: 1.96 for 0.95."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    x = dof / (dof + t * t)
    tail = 0.5 * betainc(dof / 2, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t critical value: 4.303 for 0.95 and 2 degrees of freedom."""
    if dof < 1:
        raise ValueError("t needs at least one degree of freedom")
    p = 0.5 + confidence / 2
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10 * max(1.0, mid):
            break
    return (lo + hi) / 2


def wilson(hits: int, n: int, confidence: float, fpc: float = 1.0) -> tuple[float, float]:
    """Wilson score interval of a share ``hits / n``, for a sample drawn without
    replacement: ``fpc`` is the finite-population factor 1 - n/N (0 when the
    whole population was looked at: the share is then exact)."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    if fpc <= 0:
        return p, p
    z = z_quantile(confidence) * math.sqrt(min(fpc, 1.0))
    z2 = z * z
    den = 1 + z2 / n
    mid = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def mean_interval(values: list[float], confidence: float) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (at least two)."""
    k = len(values)
    m = sum(values) / k
    var = sum((v - m) ** 2 for v in values) / (k - 1)
    half = t_quantile(confidence, k - 1) * math.sqrt(var / k)
    return m - half, m + half
