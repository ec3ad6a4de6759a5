"""Fitting how a cost grows with n: the log-log exponent and the best of a few growth laws.

Pure (math only, no numpy needed). For a series ``(n_i, y_i)`` with positive values:

* ``exponent``: the least-squares slope of ``log y`` on ``log n`` over every point, and
  ``exponent_last`` the slope between the two largest n (what extrapolation leans on);
* ``law``: the candidate among ``1``, ``log n``, ``n``, ``n log n``, ``n²`` that best explains the
  series as ``y = a + c·f(n)`` with ``a, c >= 0`` (a fixed cost plus the growing one), by the
  residual of ``log y`` (relative error, so small and large n weigh alike). Candidates are tried
  in that order and a later (faster-growing) one must beat the best so far by a clear margin,
  so a flat series is called constant, not ``n`` with a tiny slope;
* :func:`predict` extrapolates with the chosen law.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

#: Growth laws, simplest first: name -> f(n).
LAWS: dict[str, Callable[[float], float]] = {
    "constant": lambda n: 0.0,
    "log n": lambda n: math.log(n),
    "n": lambda n: n,
    "n log n": lambda n: n * math.log(n),
    "n^2": lambda n: n * n,
}

#: A faster-growing law must lower the rms log residual by this much (and by 20 %) to be chosen.
MARGIN = 0.02


def loglog_slope(ns: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y on log n."""
    lx = [math.log(n) for n in ns]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx if sxx else 0.0


def _fit_law(f: Callable[[float], float], ns: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """``(a, c, rms)``: ``y ≈ a + c·f(n)``, a, c >= 0, weighted least squares with weights 1/y
    (relative error); rms of ``log y - log fit``."""
    fs = [f(n) for n in ns]
    w = [1.0 / (y * y) for y in ys]

    def solve_c_only() -> tuple[float, float]:
        den = sum(wi * fi * fi for wi, fi in zip(w, fs))
        return 0.0, max(0.0, sum(wi * fi * y for wi, fi, y in zip(w, fs, ys)) / den) if den else 0.0

    def solve_a_only() -> tuple[float, float]:
        return sum(wi * y for wi, y in zip(w, ys)) / sum(w), 0.0

    sw = sum(w)
    sf = sum(wi * fi for wi, fi in zip(w, fs))
    sff = sum(wi * fi * fi for wi, fi in zip(w, fs))
    sy = sum(wi * y for wi, y in zip(w, ys))
    sfy = sum(wi * fi * y for wi, fi, y in zip(w, fs, ys))
    det = sw * sff - sf * sf
    cands = [solve_a_only(), solve_c_only()]
    if abs(det) > 1e-12 * max(1.0, sw * sff):
        a, c = (sy * sff - sf * sfy) / det, (sw * sfy - sf * sy) / det
        if a >= 0 and c >= 0:
            cands.append((a, c))
    best = None
    for a, c in cands:
        fit = [a + c * fi for fi in fs]
        if min(fit) <= 0:
            continue
        rms = math.sqrt(sum((math.log(y) - math.log(v)) ** 2 for y, v in zip(ys, fit)) / len(ys))
        if best is None or rms < best[2]:
            best = (a, c, rms)
    return best if best is not None else (0.0, 0.0, math.inf)


def fit_growth(ns: Sequence[float], ys: Sequence[float]) -> dict[str, Any]:
    """The growth of ``ys`` over ``ns`` (at least two points with distinct n, every value > 0):
    ``{"exponent", "exponent_last", "law", "a", "c", "rms", "residuals": {law: rms}}``."""
    pts = sorted((float(n), float(y)) for n, y in zip(ns, ys) if y > 0 and n > 0)
    if len({n for n, _ in pts}) < 2:
        raise ValueError("fit_growth needs at least two points with distinct n and y > 0")
    xs, vs = [p[0] for p in pts], [p[1] for p in pts]
    fits = {name: _fit_law(f, xs, vs) for name, f in LAWS.items()}
    chosen = "constant"
    for name in LAWS:
        if fits[name][2] < fits[chosen][2] - MARGIN and fits[name][2] < 0.8 * fits[chosen][2]:
            chosen = name
    (n1, y1), (n2, y2) = pts[-2], pts[-1]
    a, c, rms = fits[chosen]
    return {
        "exponent": loglog_slope(xs, vs),
        "exponent_last": math.log(y2 / y1) / math.log(n2 / n1),
        "law": chosen,
        "a": a,
        "c": c,
        "rms": rms,
        "residuals": {k: v[2] for k, v in fits.items()},
    }


def predict(fit: dict[str, Any], n: float) -> float:
    """The value the fitted law gives at ``n``."""
    return fit["a"] + fit["c"] * LAWS[fit["law"]](n)
