"""The one bisection (zeda_lightning.solve): checked by hand on functions whose answer is known."""

import math

import pytest

from zeda_lightning.solve import bisect_monotone


def test_continuous_increasing_function_with_the_bracket_grown_by_doubling():
    calls = []

    def cube(x):
        calls.append(x)
        return x**3

    x, fx = bisect_monotone(cube, 27.0, iters=60, grow_until=1e4)
    assert x == pytest.approx(3.0, abs=1e-9) and fx == pytest.approx(27.0, abs=1e-6)
    assert calls[:4] == [-1.0, 1.0, 2.0, 4.0]  # both ends, then hi doubled until cube(hi) >= 27
    x, _ = bisect_monotone(cube, -27.0, iters=60, grow_until=1e4)  # lo grows the other way
    assert x == pytest.approx(-3.0, abs=1e-9)


def test_decreasing_function_on_a_fixed_bracket():
    x, fx = bisect_monotone(lambda p: 1.0 - p, 0.25, 0.0, 1.0, iters=40, increasing=False)
    assert x == pytest.approx(0.75, abs=1e-9) and fx == pytest.approx(0.25, abs=1e-9)


def test_step_function_returns_the_end_whose_value_is_closest():
    # floor is a step function: 2.4 is never hit; the bracket closes on x = 3 from both sides, where floor is 2
    # (left of 3) and 3 (at 3): 2 is nearer to 2.4, so the left end comes back
    x, fx = bisect_monotone(math.floor, 2.4, iters=50, grow_until=1e4)
    assert fx == 2 and 2.999 < x < 3.0
    x, fx = bisect_monotone(math.floor, 2.6, iters=50, grow_until=1e4)
    assert fx == 3 and x == pytest.approx(3.0)


def test_tolerance_stops_at_the_first_midpoint_within_it():
    calls = []

    def f(x):
        calls.append(x)
        return x

    x, fx = bisect_monotone(f, 0.26, -1.0, 1.0, iters=100, tol=0.05)
    assert calls == [-1.0, 1.0, 0.0, 0.5, 0.25] and (x, fx) == (0.25, 0.25)


def test_unreachable_target_returns_the_nearest_end_and_bad_brackets_are_refused():
    x, fx = bisect_monotone(lambda b: min(max(b, 0.0), 1.0), 2.0, iters=10, grow_until=8)
    # hi doubled up to grow_until (1, 2, 4, 8), f saturated below the target: every midpoint falls short, so lo climbs
    # to hi, and on the tie (both ends give 1) lo comes back
    assert fx == 1.0 and x == 8.0 - 9 / 2**10  # bracket [-1, 8] halved 10 times
    with pytest.raises(ValueError, match="lo < hi"):
        bisect_monotone(lambda x: x, 0.5, 1.0, 0.0)
    with pytest.raises(ValueError, match="lo < 0 < hi"):
        bisect_monotone(lambda x: x, 0.5, 0.001, 1.0, grow_until=10)


def test_midpoint_returns_the_final_brackets_middle():
    """[0, 1] halved three times towards 0.3 on f(x) = x: brackets [0, .5], [.25, .5], [.25, .375] -> 0.3125."""
    x, fx = bisect_monotone(lambda v: v, 0.3, 0.0, 1.0, iters=3, midpoint=True)
    assert x == 0.3125 and fx == 0.3125
