"""Monotone 1-d root finding: the one bisection behind the budget knob (zero-logit bias -> zero ratio) and the
benches' knob calibrations (top-p's p, a block's bias). Plain Python, importable from every layer.
"""

from __future__ import annotations

from collections.abc import Callable


def bisect_monotone(
    f: Callable[[float], float],
    target: float,
    lo: float = -1.0,
    hi: float = 1.0,
    *,
    iters: int = 40,
    increasing: bool = True,
    grow_until: float | None = None,
    tol: float | None = None,
    midpoint: bool = False,
) -> tuple[float, float]:
    """``(x, f(x))`` with ``f(x)`` closest to ``target``, for ``f`` monotone on the bracket (a step function too).

    ``f`` is non-decreasing (``increasing=False``: non-increasing). With ``grow_until``, the bracket is widened
    first by doubling: ``lo`` (< 0) while ``f(lo)`` is still past the target, ``hi`` (> 0) while ``f(hi)`` falls
    short, each until its magnitude reaches ``grow_until``. Then ``iters`` bisection steps, and the bracket end
    whose value is closer to ``target`` is returned (``lo`` on a tie). With ``tol``, the first midpoint within
    ``tol`` of the target is returned at once; ``midpoint=True`` returns the final bracket's midpoint instead of an
    end (a knob between the two, as the frontier's top-p calibration always chose). An unreachable target returns
    the nearer end, so check ``f(x)``.
    """
    if not lo < hi:
        raise ValueError(f"bisect_monotone: need lo < hi, got [{lo}, {hi}]")
    if grow_until is not None and not lo < 0 < hi:
        raise ValueError(f"bisect_monotone: growing the bracket by doubling needs lo < 0 < hi, got [{lo}, {hi}]")
    sign = 1.0 if increasing else -1.0  # compare sign * f, which is non-decreasing

    def below(value: float) -> bool:
        return sign * value < sign * target

    def above(value: float) -> bool:
        return sign * value > sign * target

    f_lo, f_hi = f(lo), f(hi)
    if grow_until is not None:
        while above(f_lo) and -lo < grow_until:
            lo *= 2
            f_lo = f(lo)
        while below(f_hi) and hi < grow_until:
            hi *= 2
            f_hi = f(hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        f_mid = f(mid)
        if tol is not None and abs(f_mid - target) <= tol:
            return mid, f_mid
        if below(f_mid):
            lo, f_lo = mid, f_mid
        else:
            hi, f_hi = mid, f_mid
    if midpoint:
        mid = (lo + hi) / 2
        return mid, f(mid)
    return (lo, f_lo) if abs(f_lo - target) <= abs(f_hi - target) else (hi, f_hi)
