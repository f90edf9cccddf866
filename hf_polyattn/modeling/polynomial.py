"""Polynomial and iterative (+, × only) approximations, with their multiplicative depth.

Every approximation is a *circuit* written with `+`, `-` and `*` alone, so the same code runs on
torch tensors (the plaintext polynomial mode), on `symbolic.SymbolicCipher`s (which measure depth and
count multiplications), and on anything else with those operators (ciphertexts). Each one is described
by plain data (`spec`: kind, method, degree / iterations, domain) so a config can store it.

Conventions for depth: multiplying two encrypted values (ct×ct) or an encrypted value by a
constant (ct×pt) consumes one level; additions and adding constants are free, and so is any
arithmetic between plain numbers.

Every approximation reads a *mapped* input `t = scale·x + shift` (`mapping`): the server folds
that affine map into the plaintext matrix that produces `x`, at no level cost, so `depth` is the
depth of `circuit_mapped(t)` on a fresh `t`; `circuit(x)` applies the map itself (one more ct×pt
unless the map is the identity).
"""

import copy
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .symbolic import measure_circuit

KINDS = ("reciprocal", "inv_sqrt", "activation")
RECIPROCAL_METHODS = ("goldschmidt", "newton")
ACTIVATION_FITS = ("minimax", "least_squares")
SWEEP_POINTS = 20001  # points used to state an approximation's max error over its domain
DEFAULT_TOLERANCE = 1e-3  # max relative error of 1/x and 1/sqrt(x): picks init degree and iterations
AUTO_INIT_DEGREES = (0, 1, 3, 7, 15, 31)  # 2^m - 1: the most degree per level (depth m)
AUTO_ACTIVATION_DEGREES = (3, 7, 15, 31, 63, 127)  # a wide domain (SmolLM2's gates span ±20) needs 63
MAX_ITERATIONS = 40
IDENTITY = (1.0, 0.0)
CARRIED_RESIDUAL_LIMIT = 1e6  # largest 1/e0 a reciprocal carries from its guess's power chain


# ---------------------------------------------------------------------------------------------
# Circuits (operators only)
# ---------------------------------------------------------------------------------------------


NEGLIGIBLE_COEFFICIENT = 1e-12
PLAINTEXT_CHUNK = 65536  # elements per piece when the plaintext form evaluates a circuit (float64: 512 KB)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _significant(coefficients: list[float]) -> list[float]:
    """Coefficients with the negligible ones zeroed and trailing zeros trimmed (c0 is kept as is).

    Terms below 1e-12 (an odd function's even coefficients, ...) are rounding noise of the fit, and
    a CKKS scalar that small encodes to an all-zero plaintext: drop them on every backend alike.
    `c0` is only ever added, never multiplied, so it is kept whatever its size.
    """
    if len(coefficients) == 0:
        raise ValueError("a Chebyshev series needs at least one coefficient")
    kept = [float(coefficients[0])] + [
        float(c) if abs(c) > NEGLIGIBLE_COEFFICIENT else 0.0 for c in coefficients[1:]
    ]
    while len(kept) > 1 and kept[-1] == 0.0:
        kept.pop()
    return kept


def effective_degree(coefficients: list[float]) -> int:
    """The degree `chebyshev_series` actually evaluates (negligible top coefficients dropped)."""
    return len(_significant(coefficients)) - 1


def chebyshev_depth(degree: int) -> int:
    """Depth of `chebyshev_series` for a degree-`degree` series on a fresh input: `ceil(log2(d+1))`."""
    return max(int(degree), 0).bit_length()


class ChebyshevPowers:
    """The power-of-two Chebyshev values `P_m = scale^m · T_m(u)` of `t = scale·u`, built once.

    `P_1 = t`, `P_2m = 2·P_m² − scale^(2m)` (the 2 an addition): squarings only, no ct×pt, so
    `P_(2^i)` sits at depth `i`. `scale = 1` is the plain chain `T_2 = 2t² − 1`, ...; another
    scale lets the input map fold a constant into a top power (see `ReciprocalApproximation`).
    """

    def __init__(self, t, scale: float = 1.0):
        self.t, self.scale = t, float(scale)
        self._powers = {1: t}

    def __call__(self, m: int):
        """`P_m` for `m` a power of two."""
        if m not in self._powers:
            half = self(m // 2)
            square = half * half
            self._powers[m] = square + square - self.scale ** m
        return self._powers[m]

    def series(self, coefficients: list[float]):
        """`Σ_k c_k T_k(u)`: see `chebyshev_series`; `T_m = P_m / scale^m`, the factor folded into
        the plain coefficients that multiply it."""
        t, scale = self.t, self.scale

        def evaluate(c: list[float]):
            c = _significant(c)
            degree = len(c) - 1
            if degree == 0:
                return c[0]
            if degree == 1:
                leaf = (c[1] / scale) * t
                return leaf + c[0] if c[0] else leaf
            m = 1 << (degree.bit_length() - 1)
            factor = scale**-m
            high = [c[m] * factor] + [2.0 * c[m + j] * factor for j in range(1, degree - m + 1)]
            low = c[:m]
            for j in range(1, degree - m + 1):
                low[m - j] -= c[m + j]
            low_value, high_value = evaluate(low), evaluate(high)
            product = high_value * self(m)
            if _is_number(low_value) and low_value == 0.0:
                return product
            return product + low_value

        return evaluate(list(coefficients))


def chebyshev_series(t, coefficients: list[float], scale: float = 1.0):
    """`Σ_k c_k T_k(u)` for `t = scale·u`, `u` in [-1, 1], at depth `ceil(log2(d+1))` for degree `d >= 1`.

    Recursive split at `m`, the largest power of two `<= d`, with `T_{m+j} = 2 T_m T_j - T_{m-j}`:
    `p = q + r·T_m`, `r = c_m + 2 Σ_{j>=1} c_{m+j} T_j` (degree `d-m < m`),
    `q = Σ_{k<m} c_k T_k - Σ_{j>=1} c_{m+j} T_{m-j}` (degree `< m`). By induction `q` and `r` sit
    at depth `<= log2 m`, like `T_m`, so `p` sits at `log2(m) + 1`; leaves `c0 + c1·u` take the
    only ct×pt of their branch. The power-of-two `T`s are built once and shared
    (`ChebyshevPowers`). Every value stays a combination of `T_k`s bounded by 1, so it is stable
    in float64 where the power basis would need huge cancelling coefficients.
    """
    return ChebyshevPowers(t, scale).series(coefficients)


def goldschmidt_product(initial_guess, error, iterations: int):
    """`y0 · Π_{i<k} (1 + e^(2^i))`: `1/x` with relative error `|e|^(2^k)` when `e = 1 − x·y0`.

    One level a step: depth `max(depth(y0), depth(e)) + k`.
    """
    y = initial_guess
    for step in range(iterations):
        if step:
            error = error * error
        y = y * (1.0 + error)
    return y


def goldschmidt_reciprocal(x, iterations: int, initial_guess):
    """`1/x` by Goldschmidt: `e = 1 - x·y0`, `1/x ≈ y0 · Π_{i<k} (1 + e^(2^i))`.

    Relative error `|e|^(2^k)`. Depth `depth(y0) + 1 + k` for `k >= 1` when `y0` is encrypted
    (and `x` at depth <= depth(y0)). From a number `c` the first step folds into one ct×pt,
    `y1 = 2c - c²·x` (and `e = 1 - c·x` alongside): depth 1 for `k = 1`, `k + 1` beyond.
    """
    if iterations == 0:
        return initial_guess
    if _is_number(initial_guess):
        c = float(initial_guess)
        y = (-c * c) * x + 2.0 * c
        if iterations == 1:
            return y
        error = (-c) * x + 1.0
        return goldschmidt_product(y, error * error, iterations - 1)
    return goldschmidt_product(initial_guess, 1.0 - x * initial_guess, iterations)


def newton_reciprocal(x, iterations: int, initial_guess):
    """`1/x` by Newton's iteration `y ← y·(2 − x·y)`: relative error squares, two levels a step.

    From a number `c` the first step folds into one ct×pt (`y1 = 2c - c²·x`): depth `2k - 1`.
    """
    y, start = initial_guess, 0
    if iterations and _is_number(y):
        c = float(y)
        y, start = (-c * c) * x + 2.0 * c, 1
    for _ in range(start, iterations):
        y = y * (2.0 - x * y)
    return y


def newton_inverse_sqrt(x, iterations: int, initial_guess, half_x=None):
    """`1/sqrt(x)` by Newton's iteration `y ← 1.5·y − (x/2·y)·(y·y)`: two levels a step.

    `x/2·y` and `y·y` run side by side and `1.5·y` is off the critical path. `half_x` (`x/2`) may
    be given, e.g. folded into the product that recovers `x` from a mapped input (then `x` may be
    `None` unless the guess is a number). From a number `c` the first step folds into one ct×pt
    (`y1 = 1.5c − (c³/2)·x`): depth `2k − 1`.
    """
    y, start = initial_guess, 0
    if iterations and _is_number(y):
        c = float(y)
        y, start = (-0.5 * c**3) * x + 1.5 * c, 1
    if start < iterations and half_x is None:
        half_x = 0.5 * x
    for _ in range(start, iterations):
        y = 1.5 * y - (half_x * y) * (y * y)
    return y


# ---------------------------------------------------------------------------------------------
# Fitting (float64 torch)
# ---------------------------------------------------------------------------------------------


def _chebyshev_nodes(count: int) -> torch.Tensor:
    k = torch.arange(count, dtype=torch.float64, device="cpu")  # "cpu" even under a meta-device init
    return torch.cos(math.pi * (k + 0.5) / count)


def _chebyshev_basis_matrix(t: torch.Tensor, degree: int) -> torch.Tensor:
    columns = [torch.ones_like(t), t]
    for _ in range(2, degree + 1):
        columns.append(2 * t * columns[-1] - columns[-2])
    return torch.stack(columns[: degree + 1], dim=-1)


def interval_map(low: float, high: float) -> tuple[float, float]:
    """`(scale, shift)` of the affine map taking [low, high] onto [-1, 1]."""
    return 2.0 / (high - low), -(high + low) / (high - low)


def fit_chebyshev(
    function: Callable[[torch.Tensor], torch.Tensor],
    low: float,
    high: float,
    degree: int,
    relative: bool = False,
) -> list[float]:
    """Least-squares Chebyshev coefficients of `function` on [low, high] (in the mapped variable t).

    `relative=True` weights the fit by `1/|function|`, for targets such as `1/x` whose relative
    error is what matters.
    """
    t = _chebyshev_nodes(max(4 * (degree + 1), 64))
    x = 0.5 * (high - low) * t + 0.5 * (high + low)
    target = function(x)
    matrix = _chebyshev_basis_matrix(t, degree)
    if relative:
        weight = 1.0 / target.abs()
        matrix, target = matrix * weight[:, None], target * weight
    solution = torch.linalg.lstsq(matrix, target[:, None], driver="gelsd").solution
    return [float(c) for c in solution[:, 0]]


def _alternating_extrema(error: torch.Tensor, count: int) -> torch.Tensor | None:
    """Indices of `count` extrema of `error` with alternating signs, or None if it alternates less.

    One extremum per run of equal sign (so signs alternate), then thinned to `count` keeping
    alternation and the global maximum: drop the weakest end point, or drop the weakest interior
    point together with its weaker neighbour (its two neighbours share a sign: one of them goes).
    Rounding-noise sign flips near a zero of the error give tiny runs, which go first.
    """
    positive = error >= 0
    run = torch.cat([torch.zeros(1, dtype=torch.long, device="cpu"), (positive[1:] != positive[:-1]).long().cumsum(0)])
    runs = int(run[-1]) + 1
    if runs < count:
        return None
    magnitude = error.abs()
    peak = torch.zeros(runs, dtype=error.dtype, device="cpu")
    peak = peak.scatter_reduce(0, run, magnitude, "amax", include_self=False)
    index = torch.arange(len(error), device="cpu")
    candidates = torch.where(magnitude == peak[run], index, len(error))
    first = torch.full((runs,), len(error), dtype=torch.long, device="cpu").scatter_reduce(0, run, candidates, "amin")
    points, values = first.tolist(), peak.tolist()
    while len(points) > count:
        weakest = min(range(len(values)), key=values.__getitem__)
        if len(points) - count == 1 or weakest in (0, len(points) - 1):
            drop = [0] if values[0] <= values[-1] else [len(points) - 1]
        else:
            drop = [weakest, weakest - 1 if values[weakest - 1] < values[weakest + 1] else weakest + 1]
        for i in sorted(drop, reverse=True):
            del points[i], values[i]
    return torch.tensor(points, device="cpu")


def minimax_chebyshev(
    function: Callable[[torch.Tensor], torch.Tensor],
    low: float,
    high: float,
    degree: int,
    relative: bool = False,
    points: int | None = None,
    max_steps: int = 60,
) -> list[float]:
    """Minimax Chebyshev coefficients (in the mapped variable t) of `function` on [low, high].

    Remez exchange on a dense Chebyshev grid in t: on a reference of `degree + 2` points solve
    `p(t_i) + (-1)^i E / w_i = f(t_i)` for the coefficients and the levelled error `E`, move the
    reference to the alternating extrema of the weighted error `w·(f − p)`, and stop once its
    max equals `|E|` (de la Vallée Poussin: the optimum lies between them). `relative=True`
    minimises `max |(f − p)/f|` (`w = 1/|f|`). The least-squares fit is the fallback: the result
    is whichever of the two has the smaller max error on the grid.
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"minimax_chebyshev: degree must be an integer >= 0, got {degree!r}")
    count = points or max(8193, 128 * (degree + 2))
    t = torch.cos(math.pi * torch.arange(count - 1, -1, -1, dtype=torch.float64, device="cpu") / (count - 1))
    x = 0.5 * (high - low) * t + 0.5 * (high + low)
    x[0], x[-1] = low, high
    target = function(x).to(torch.float64)
    if not torch.isfinite(target).all():
        raise ValueError(f"minimax_chebyshev: the function is not finite on [{low}, {high}]")
    if relative:
        if not (target != 0).all():
            raise ValueError(f"minimax_chebyshev: a relative fit needs a function without zeros on [{low}, {high}]")
        weight = 1.0 / target.abs()
    else:
        weight = torch.ones_like(target)
    basis = _chebyshev_basis_matrix(t, degree)

    def weighted_error(coefficients: torch.Tensor) -> torch.Tensor:
        return (target - basis @ coefficients) * weight

    best = torch.tensor(fit_chebyshev(function, low, high, degree, relative), dtype=torch.float64, device="cpu")
    best_error = float(weighted_error(best).abs().max())
    # Start from the extrema of T_{d+1}: the optimum's reference for 1/x, close to it in general.
    start = torch.cos(math.pi * torch.arange(degree + 1, -1, -1, dtype=torch.float64, device="cpu") / (degree + 1))
    reference = torch.searchsorted(t, start).clamp(max=count - 1)
    signs = torch.tensor([(-1.0) ** i for i in range(degree + 2)], dtype=torch.float64, device="cpu")
    for _ in range(max_steps):
        if len(torch.unique(reference)) < degree + 2:
            break
        system = torch.cat([basis[reference], (signs / weight[reference])[:, None]], dim=1)
        try:
            solution = torch.linalg.solve(system, target[reference])
        except RuntimeError:  # a singular reference: the exchange broke down
            break
        if not torch.isfinite(solution).all():
            break
        coefficients, levelled = solution[:-1], abs(float(solution[-1]))
        error = weighted_error(coefficients)
        worst = float(error.abs().max())
        if worst < best_error:
            best, best_error = coefficients, worst
        if worst - levelled <= 1e-6 * worst:
            break
        reference = _alternating_extrema(error, degree + 2)
        if reference is None:
            break
    return [float(c) for c in best]


def _cosh_chebyshev(degree: int, argument: float) -> float:
    """`T_degree(argument)` for `argument >= 1`, inf past float range."""
    try:
        return math.cosh(degree * math.acosh(argument))
    except OverflowError:
        return math.inf


def reciprocal_minimax_error(low: float, high: float, degree: int) -> float:
    """Max relative error of the best degree-`degree` polynomial for `1/x` on [low, high]:
    `1/T_{d+1}(μ(0))` with `μ` mapping [low, high] onto [1, -1]."""
    return 1.0 / _cosh_chebyshev(degree + 1, (high + low) / (high - low))


def minimax_reciprocal(low: float, high: float, degree: int) -> list[float]:
    """Relative-minimax Chebyshev coefficients (in t) of `1/x` on [low, high], in closed form.

    `1 − x·p(x) = T_{d+1}(μ(x)) / T_{d+1}(μ(0))`, `μ` mapping [low, high] onto [1, −1]: it
    equioscillates at the `d + 2` extrema of `T_{d+1}`, so `p` is the optimum. The right side
    vanishes at `x = 0`, so `p` is a polynomial of degree `d`, recovered exactly by a fit.
    """
    top = _cosh_chebyshev(degree + 1, (high + low) / (high - low))

    def p(x: torch.Tensor) -> torch.Tensor:
        mu = ((high + low - 2.0 * x) / (high - low)).clamp(-1.0, 1.0)
        return (1.0 - torch.cos((degree + 1) * torch.acos(mu)) / top) / x

    return fit_chebyshev(p, low, high, degree)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; transformers knows {sorted(ACT2FN)}")
    return ACT2FN[name]


@functools.lru_cache(maxsize=512)
def _initial_guess(kind: str, low: float, high: float, degree: int) -> tuple[float, ...]:
    """Chebyshev coefficients (in t) of the best relative initial guess of `degree` (cached: auto
    choices and spec rebuilds refit the same guesses)."""
    if kind == "reciprocal":
        if degree == 0:
            return (2.0 / (low + high),)  # minimises max |1 - c·x| over the domain
        return tuple(minimax_reciprocal(low, high, degree))
    if degree == 0:
        return (math.sqrt(2.0 / (low + high)),)  # minimises max |1 - x·c²| over the domain
    # Newton squares e = 1 - x·y0², not y0's relative error: with s = sqrt(x)·y0 in [s_lo, s_hi],
    # max |e| is least for s_lo² + s_hi² = 2, at (ρ² - 1)/(ρ² + 1) with ρ = s_hi/s_lo. The
    # relative-minimax shape has the least ρ, so scaled that way it is the minimax of |e|.
    coefficients = minimax_chebyshev(torch.rsqrt, low, high, degree, relative=True)
    x = torch.logspace(math.log10(low), math.log10(high), SWEEP_POINTS, dtype=torch.float64, device="cpu")
    scale, shift = interval_map(low, high)
    s = x.sqrt() * chebyshev_series(scale * x + shift, coefficients)
    gain = math.sqrt(2.0 / (float(s.min()) ** 2 + float(s.max()) ** 2))
    return tuple(c * gain for c in coefficients)


# ---------------------------------------------------------------------------------------------
# Approximations
# ---------------------------------------------------------------------------------------------


def _check_domain(kind: str, domain) -> tuple[float, float]:
    if len(domain) != 2:
        raise ValueError(f"{kind}: domain must be [low, high], got {domain!r}")
    low, high = float(domain[0]), float(domain[1])
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"{kind}: domain must have low < high, got [{low}, {high}]")
    if kind in ("reciprocal", "inv_sqrt") and low <= 0:
        raise ValueError(f"{kind}: domain must be positive (low > 0), got [{low}, {high}]")
    return low, high


def _check_count(kind: str, name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{kind}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


class Approximation:
    """Base class: a circuit on a domain with its declared depth and stated max error.

    `mapping = (scale, shift)`: the circuit's polynomial reads `t = scale·x + shift`, which the
    server folds into the plaintext product before it. `circuit_mapped(t)` is the operator-only
    form any backend can run, `circuit(x)` applies the map first; calling it on a tensor computes
    in float64 and returns the input dtype.
    """

    kind: str
    error_kind: str  # "relative" or "absolute"
    mapping: tuple[float, float] = IDENTITY

    def __init__(self, domain):
        self.domain = _check_domain(self.kind, domain)
        self.max_error = self.sweep_error(SWEEP_POINTS)

    def circuit_mapped(self, t):
        """The circuit given the mapped input `t = scale·x + shift`."""
        raise NotImplementedError

    def circuit(self, x):
        """The circuit given `x`: `circuit_mapped(scale·x + shift)` (no product for the identity)."""
        scale, shift = self.mapping
        if (scale, shift) == IDENTITY:
            return self.circuit_mapped(x)
        return self.circuit_mapped(scale * x + shift)

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        """Declared multiplicative depth of `circuit_mapped` on a fresh input (levels consumed)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """Plain data that `build_approximation` rebuilds this approximation from."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The circuit is elementwise: on the CPU run it on cache-sized pieces of x so its dozens of
        # float64 intermediates stay in cache (identical values; a degree-127 activation on a
        # 4×700×1536 tensor runs 14× faster than on the whole tensor at once). On an accelerator
        # every piece would pay its own hundreds of kernel launches: one piece.
        flat = x.reshape(-1)
        piece = PLAINTEXT_CHUNK if flat.device.type == "cpu" else max(1, flat.numel())
        pieces = [self._circuit_float64(part) for part in flat.split(piece)] if flat.numel() else [flat.double()]
        return torch.cat(pieces).view(x.shape).to(x.dtype)

    def _circuit_float64(self, x: torch.Tensor) -> torch.Tensor:
        out = self.circuit(x.double())
        if not isinstance(out, torch.Tensor):  # a constant circuit (no iterations from a constant guess)
            out = torch.full_like(x, out, dtype=torch.float64)
        return out

    def measure(self) -> dict[str, int]:
        """Depth and multiplication counts measured by running `circuit_mapped` on a `SymbolicCipher`."""
        return measure_circuit(self.circuit_mapped)

    def sweep(self, points: int) -> torch.Tensor:
        """`points` inputs spread over the domain (log-spaced for relative errors)."""
        low, high = self.domain
        if self.error_kind == "relative":  # positive domains spanning decades: sweep on a log scale
            grid = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64, device="cpu")
        else:
            grid = torch.linspace(low, high, points, dtype=torch.float64, device="cpu")
        grid[0], grid[-1] = low, high
        return grid

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """Absolute or relative (per `error_kind`) errors of `circuit` at `x`."""
        approx, exact = self.circuit(x), self.exact(x)
        difference = (approx - exact).abs()
        return difference / exact.abs() if self.error_kind == "relative" else difference

    def sweep_error(self, points: int) -> float:
        """The max error over `points` spread over the domain."""
        return float(self.errors(self.sweep(points)).max())

    def describe(self) -> dict[str, Any]:
        """The spec with the measured depth, multiplication counts and the stated max error."""
        return {**self.spec(), **self.measure(), "max_error": self.max_error, "error_kind": self.error_kind}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()}, depth={self.depth}, max_error={self.max_error:.2e})"


class ChebyshevApproximation(Approximation):
    """A Chebyshev polynomial of `degree` for an activation on [low, high], absolute error.

    `fit="minimax"` (Remez, the least max error for the degree) or `"least_squares"` (the only
    fit before minimax existed: `build_approximation` uses it for specs without a `"fit"`).
    The input map takes the domain onto [-1, 1]; depth `ceil(log2(d + 1))` for the degree `d`
    actually evaluated (`degree`, unless its top coefficients are negligible, e.g. an odd
    function's even top).
    """

    kind = "activation"
    error_kind = "absolute"

    def __init__(self, function: str, degree: int | str, domain, fit: str = "minimax", tolerance: float = DEFAULT_TOLERANCE):
        self.function = function
        if fit not in ACTIVATION_FITS:
            raise ValueError(f"activation: fit must be one of {ACTIVATION_FITS}, got {fit!r}")
        self.fit = fit
        self._target = _activation(function)
        low, high = _check_domain(self.kind, domain)
        self.mapping = interval_map(low, high)
        fitter = minimax_chebyshev if fit == "minimax" else fit_chebyshev
        if degree == "auto":  # the lowest 2^m - 1 degree whose max absolute error meets the tolerance
            if not tolerance > 0:
                raise ValueError(f"activation: tolerance must be > 0, got {tolerance}")
            self.domain = (low, high)  # what sweep_error reads, before the base class sets it
            for degree in AUTO_ACTIVATION_DEGREES:
                self.coefficients = fitter(self._target, low, high, degree)
                error = self.sweep_error(2049)
                if error <= tolerance:
                    break
            else:  # said at calibration, not found later in the logits
                warnings.warn(
                    f"{function} on [{low:.4g}, {high:.4g}]: degree {degree}, the highest tried, leaves a max error "
                    f"of {error:.2g} (tolerance {tolerance:g}); a domain this wide (massive activations) needs a "
                    "range loss during training to narrow it, or a fixed higher degree",
                    stacklevel=2,
                )
            self.degree = degree
        else:
            self.degree = _check_count(self.kind, "degree", degree, 1)
            self.coefficients = fitter(self._target, low, high, self.degree)
        super().__init__(domain)

    def exact(self, x):
        return self._target(x)

    def circuit_mapped(self, t):
        return chebyshev_series(t, self.coefficients)

    @property
    def depth(self) -> int:
        return chebyshev_depth(effective_degree(self.coefficients))

    def spec(self):
        return {
            "kind": self.kind,
            "function": self.function,
            "degree": self.degree,
            "fit": self.fit,
            "domain": list(self.domain),
        }


class _IterativeApproximation(Approximation):
    """An iteration from an initial guess of `init_degree` (0: the best constant).

    A guess of degree `d >= 1` is a minimax polynomial in `u`, the domain mapped onto [-1, 1]
    (depth `ceil(log2(d+1))`): the relative minimax for `1/x`; for `1/sqrt(x)` the relative
    minimax scaled to be the minimax of `|1 − x·y0²|`, the error Newton squares. The map reads
    `t = chain_scale·u` (1 but for a reciprocal that carries its residual). Where a step needs
    `x` it is recovered as `(t − shift)/scale`: one ct×pt on the fresh `t`, off the critical path.
    A constant guess needs no polynomial: the map is the identity and the first step folds into
    one ct×pt. `init_degree="auto"` tries `AUTO_INIT_DEGREES`, each with the fewest iterations
    meeting `tolerance` (max relative error on the sweep), and keeps the least depth, then the
    fewest ct×ct, then the lowest degree; `spec()` records the resolved integers. A guess from
    which the iteration may not converge (max `|1 − x·y0|`, resp. `|1 − x·y0²|`, >= 1) is skipped
    by "auto" and refused when asked for.
    """

    error_kind = "relative"
    method: str
    chain_scale: float = 1.0  # t = chain_scale·u, u the domain mapped onto [-1, 1]

    def __init__(self, iterations: int | None, domain, init_degree: int | str = 0, tolerance: float = DEFAULT_TOLERANCE):
        low, high = _check_domain(self.kind, domain)
        self.domain = (low, high)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
            raise ValueError(f"{self.kind}: tolerance must be a number > 0, got {tolerance!r}")
        self.tolerance = float(tolerance)
        if iterations is not None:
            _check_count(self.kind, "iterations", iterations, 0)
        if init_degree == "auto":
            if iterations is not None:
                raise ValueError(f"{self.kind}: init_degree='auto' chooses the iterations; pass iterations=None")
            self._choose(self.tolerance)
        else:
            degree = _check_count(self.kind, "init_degree", init_degree, 0)
            initial_error = self._use_initial_guess(degree)
            if not initial_error < 1:
                residual = "|1 - x·y0|" if self.kind == "reciprocal" else "|1 - x·y0²|"
                raise ValueError(
                    f"{self.kind}: the degree-{degree} initial guess does not converge on [{low}, {high}] "
                    f"(max {residual} = {initial_error:.3f}); use init_degree=0 or 'auto'"
                )
            self.iterations = self._iterations_for(self.tolerance) if iterations is None else iterations
        super().__init__(domain)

    # -- the initial guess -----------------------------------------------------------------------

    def _use_initial_guess(self, degree: int) -> float:
        """Install the guess of `degree`; its max `|1 − x·y0|` (resp. `|1 − x·y0²|`) on the sweep."""
        low, high = self.domain
        self.init_degree = degree
        self.coefficients = list(_initial_guess(self.kind, low, high, degree))
        self.chain_scale = 1.0
        self._prepare_guess(degree)
        if degree == 0:
            self.mapping = IDENTITY
        else:
            scale, shift = interval_map(low, high)
            self.mapping = (scale * self.chain_scale, shift * self.chain_scale)
        return float(self._initial_errors(self.sweep(SWEEP_POINTS)).abs().max())

    def _prepare_guess(self, degree: int) -> None:
        """Per-kind set-up after the guess's coefficients are installed (e.g. `chain_scale`)."""

    @property
    def init_coefficients(self) -> list[float]:
        """The initial guess's Chebyshev coefficients in `t` (alias of `coefficients`)."""
        return self.coefficients

    def initial_guess(self, x):
        """`y0` at `x` (a number for a constant guess)."""
        if self.init_degree == 0:
            return self.coefficients[0]
        scale, shift = self.mapping
        return chebyshev_series(scale * x + shift, self.coefficients, self.chain_scale)

    def _initial_errors(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _guess(self, t, gain: float = 1.0):
        """The initial guess given the mapped input (a number for a constant guess), times `gain`
        (folded into the coefficients: no level)."""
        coefficients = self.coefficients if gain == 1.0 else [c * gain for c in self.coefficients]
        return chebyshev_series(t, coefficients, self.chain_scale) if self.init_degree else coefficients[0]

    def _recovered_x(self, t, factor: float = 1.0):
        """`factor·x` from the mapped input: `(t − shift)·(factor/scale)`, one ct×pt on the fresh
        `t` (none for the identity map and factor 1)."""
        scale, shift = self.mapping
        if (scale, shift) == IDENTITY:
            return t if factor == 1.0 else factor * t
        return (t - shift) * (factor / scale)

    # -- choosing iterations and the guess -------------------------------------------------------

    def _iterations_for(self, tolerance: float) -> int:
        """The fewest iterations whose sweep error meets `tolerance` (the best reachable if none)."""
        grid = self.sweep(SWEEP_POINTS)
        previous = math.inf
        for k in range(MAX_ITERATIONS + 1):
            self.iterations = k
            error = float(self.errors(grid).max())
            if error <= tolerance:
                return k
            if not error < previous:  # stalled at rounding: more steps cannot help
                return max(k - 1, 0)
            previous = error
        return MAX_ITERATIONS

    def _choose(self, tolerance: float) -> None:
        best = None
        for degree in AUTO_INIT_DEGREES:
            if not self._use_initial_guess(degree) < 1:  # the iteration would not converge from it
                continue
            iterations = self._iterations_for(tolerance)
            self.iterations = iterations
            error = self.sweep_error(SWEEP_POINTS)
            ct_ct = self.measure()["ct_ct"]
            key = (0, self.depth, ct_ct, degree) if error <= tolerance else (1, error, self.depth, degree)
            if best is None or key < best[0]:
                best = (key, degree, iterations)
        # degree 0 always converges on a positive domain, so there is a best
        self._use_initial_guess(best[1])
        self.iterations = best[2]

    def _output_gain(self, factor: float) -> float:
        raise NotImplementedError

    def rescaled(self, factor: float) -> "_IterativeApproximation":
        """The same circuit for inputs multiplied by `factor`, on `factor·domain`.

        The guess's coefficients scale like the output and the map's scale divides by `factor`,
        so relative errors, iterations, init degree and depth are unchanged: a backend with a
        bounded value range can evaluate `1/x` as `(factor·num)·(1/(factor·den))`.
        """
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
            raise ValueError(f"{self.kind}: rescaled needs a finite factor > 0, got {factor!r}")
        low, high = self.domain
        clone = copy.copy(self)
        clone.domain = (low * factor, high * factor)
        gain = self._output_gain(float(factor))
        clone.coefficients = [c * gain for c in self.coefficients]
        if self.init_degree:
            scale, shift = self.mapping
            clone.mapping = (scale / factor, shift)
        clone.max_error = clone.sweep_error(SWEEP_POINTS)
        return clone

    def _start_depth(self) -> int:
        return chebyshev_depth(effective_degree(self.coefficients)) if self.init_degree else 0

    def spec(self):
        return {
            "kind": self.kind,
            "method": self.method,
            "iterations": self.iterations,
            "init_degree": self.init_degree,
            "domain": list(self.domain),
        }


class ReciprocalApproximation(_IterativeApproximation):
    """`1/x` on a positive [low, high] by Goldschmidt or Newton from an initial guess.

    The degree-`d` guess (`d >= 1`) is the relative minimax polynomial, whose residual is known in
    closed form: `e0 = 1 − x·y0 = T_{d+1}(μ(x)) / T_{d+1}(μ(0))` (`μ` maps the domain onto
    [1, −1]). So `e0` comes from the guess's own power chain at the guess's depth `D0` instead of
    one level later as `1 − x·y0`; for `d + 1 = 2^a` the map's scale carries the constant
    (`chain_scale = T_{d+1}(μ(0))^(−1/(d+1))`, so the chain's top power is `e0` itself).

    Depth with `k >= 1` iterations: Goldschmidt `D0 + k`, Newton `D0 + 2k − 1` (the first step
    uses `e0`, the others recompute `1 − x·y` and so correct rounding); from a constant
    (`d = 0`): Goldschmidt 1 for `k = 1` and `k + 1` beyond, Newton `2k − 1`; `k = 0`: `D0`.
    When `e0 < 1e-6` (a guess already far below any tolerance) it is not carried: Goldschmidt
    `D0 + 1 + k`, Newton `D0 + 2k`.
    """

    kind = "reciprocal"
    _residual: float | None = None  # e0's one Chebyshev coefficient (at T_{d+1}), None: 1 − x·y0

    def __init__(self, domain, iterations: int | None = None, method: str = "goldschmidt", **kwargs):
        if method not in RECIPROCAL_METHODS:
            raise ValueError(f"reciprocal: method must be one of {RECIPROCAL_METHODS}, got {method!r}")
        self.method = method
        super().__init__(iterations, domain, **kwargs)

    def _prepare_guess(self, degree: int) -> None:
        self._residual = None
        if degree == 0:
            return
        low, high = self.domain
        top = _cosh_chebyshev(degree + 1, (high + low) / (high - low))
        if not top <= CARRIED_RESIDUAL_LIMIT:
            return
        self._residual = (-1.0) ** (degree + 1) / top  # T_{d+1}(μ) = (−1)^(d+1) T_{d+1}(u), μ = −u
        if degree & (degree + 1) == 0:  # d + 1 = 2^a: P_{d+1} = chain_scale^(d+1)·T_{d+1}(u) = e0
            self.chain_scale = top ** (-1.0 / (degree + 1))

    def _carried_residual(self, powers: ChebyshevPowers):
        """`e0 = 1 − x·y0` from the guess's power chain, at depth <= the guess's."""
        degree = self.init_degree
        if degree & (degree + 1) == 0:
            return powers(degree + 1)
        return powers.series([0.0] * (degree + 1) + [self._residual])

    def _initial_errors(self, x):
        return 1.0 - x * self.initial_guess(x)

    def exact(self, x):
        return 1.0 / x

    def _output_gain(self, factor: float) -> float:
        return 1.0 / factor

    def circuit_mapped(self, t):
        k = self.iterations
        iterate = goldschmidt_reciprocal if self.method == "goldschmidt" else newton_reciprocal
        if self.init_degree == 0:
            return iterate(t, k, self.coefficients[0])  # the identity map: t is x
        powers = ChebyshevPowers(t, self.chain_scale)
        y = powers.series(self.coefficients)
        if k == 0:
            return y
        if self._residual is None:
            return iterate(self._recovered_x(t), k, y)
        error = self._carried_residual(powers)
        if self.method == "goldschmidt":
            return goldschmidt_product(y, error, k)
        y = y * (1.0 + error)  # Newton's first step, y0·(2 − x·y0), with e0 carried
        return newton_reciprocal(self._recovered_x(t), k - 1, y) if k > 1 else y

    @property
    def depth(self) -> int:
        start, k = self._start_depth(), self.iterations
        if k == 0:
            return start
        goldschmidt = self.method == "goldschmidt"
        if self.init_degree == 0:
            return (1 if k == 1 else k + 1) if goldschmidt else 2 * k - 1
        carried = self._residual is not None
        if goldschmidt:
            return start + k + (0 if carried else 1)
        return start + 2 * k - (1 if carried else 0)


class InverseSqrtApproximation(_IterativeApproximation):
    """`1/sqrt(x)` on a positive [low, high] by Newton's iteration from an initial guess.

    Depth with `k` iterations: `D0 + 2k` from a guess of depth `D0 = ceil(log2(d+1))` (`d >= 1`),
    `2k − 1` from a constant (`k >= 1`), `D0` for `k = 0`.
    """

    kind = "inv_sqrt"
    method = "newton"

    def __init__(self, domain, iterations: int | None = None, method: str = "newton", **kwargs):
        if method != "newton":
            raise ValueError(f"inv_sqrt: method must be 'newton', got {method!r}")
        super().__init__(iterations, domain, **kwargs)

    def _initial_errors(self, x):
        y = self.initial_guess(x)
        return 1.0 - x * y * y

    def exact(self, x):
        return x.rsqrt()

    def _output_gain(self, factor: float) -> float:
        return factor**-0.5

    def circuit_mapped(self, t, balance: float = 1.0):
        """`1/sqrt(x)` from the mapped input `t`. `balance = c` (a Newton step after a polynomial
        guess only): the iteration runs on `c·x` and returns `1/sqrt(c·x)`, the caller folds `√c`
        into the next product. At no level cost (`c/2` goes into the product recovering `x`,
        `1/√c` into the guess's coefficients), every intermediate stays within `sqrt(high/low)`
        for `c = 1/sqrt(low·high)`, where `x/2` alone reaches `high/2` (`balance_for`)."""
        if self.iterations == 0:
            return self._guess(t)
        if self.init_degree == 0:  # the first step folds the constant; x/2 costs its own ct×pt
            return newton_inverse_sqrt(t, self.iterations, self.coefficients[0])
        # Newton's 1/2 (and the balance) is folded into the product that recovers x
        return newton_inverse_sqrt(None, self.iterations, self._guess(t, balance**-0.5), half_x=self._recovered_x(t, 0.5 * balance))

    def balance_for(self, limit: float | None) -> float:
        """The `balance` of `circuit_mapped` keeping Newton's `x/2` within `limit`: 1 where it already
        is (or no Newton step follows a polynomial guess), else `1/sqrt(low·high)`."""
        low, high = self.domain
        if limit is None or not (self.iterations and self.init_degree) or 0.5 * high <= limit:
            return 1.0
        return 1.0 / math.sqrt(low * high)

    @property
    def depth(self) -> int:
        start, k = self._start_depth(), self.iterations
        if k == 0:
            return start
        return 2 * k - 1 if self.init_degree == 0 else start + 2 * k


def build_approximation(spec: dict[str, Any], activation: str | None = None) -> Approximation:
    """An approximation from its plain-data `spec` (as stored in `config.polynomial`).

    Activation specs without a `"fit"` (saved before minimax fits) rebuild with least squares.
    """
    spec = dict(spec)
    kind = spec.pop("kind", None)
    domain = spec.pop("domain", None)
    if domain is None:
        raise ValueError(f"{kind}: the spec has no domain: {spec}")
    if kind == "reciprocal":
        return ReciprocalApproximation(domain, **spec)
    if kind == "inv_sqrt":
        return InverseSqrtApproximation(domain, **spec)
    if kind == "activation":
        function = spec.pop("function", activation)
        spec.setdefault("fit", "least_squares")
        return ChebyshevApproximation(function, domain=domain, **spec)
    raise ValueError(f"unknown approximation kind {kind!r}; expected one of {KINDS}")


__all__ = [
    "ACTIVATION_FITS",
    "AUTO_INIT_DEGREES",
    "KINDS",
    "RECIPROCAL_METHODS",
    "SWEEP_POINTS",
    "Approximation",
    "ChebyshevApproximation",
    "InverseSqrtApproximation",
    "ReciprocalApproximation",
    "build_approximation",
    "chebyshev_depth",
    "chebyshev_series",
    "effective_degree",
    "fit_chebyshev",
    "goldschmidt_reciprocal",
    "interval_map",
    "minimax_chebyshev",
    "minimax_reciprocal",
    "newton_inverse_sqrt",
    "newton_reciprocal",
    "reciprocal_minimax_error",
]
