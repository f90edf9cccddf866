"""Polynomial and iterative (+, × only) approximations, with their multiplicative depth.

Every approximation is a *circuit* written with `+`, `-` and `*` alone, so the same code runs on
torch tensors (the plaintext polynomial mode), on `LevelCounter`s (which measure depth and count
multiplications), and on anything else with those operators (ciphertexts). Each one is described
by plain data (`spec`: kind, method, degree / iterations, domain) so a config can store it.

Conventions for depth: multiplying two encrypted values (ct×ct) or an encrypted value by a
constant (ct×pt) consumes one level; additions and adding constants are free.
"""

import math
from collections.abc import Callable
from typing import Any

import torch

KINDS = ("reciprocal", "inv_sqrt", "activation")
RECIPROCAL_METHODS = ("goldschmidt", "newton")
SWEEP_POINTS = 20001  # points used to state an approximation's max error over its domain


class LevelCounter:
    """A stand-in for a ciphertext that tracks its level and counts the multiplications made.

    `LevelCounter()` is a fresh input at level 0; arithmetic with numbers counts as ct×pt, with
    another counter as ct×ct. All counters derived from one input share one tally.
    """

    def __init__(self, level: int = 0, tally: dict[str, int] | None = None):
        self.level = level
        self.tally = tally if tally is not None else {"ct_ct": 0, "ct_pt": 0}

    def _combine(self, other: Any, multiply: bool) -> "LevelCounter":
        if isinstance(other, LevelCounter):
            if multiply:
                self.tally["ct_ct"] += 1
            return LevelCounter(max(self.level, other.level) + multiply, self.tally)
        if not isinstance(other, (int, float)):
            raise TypeError(f"LevelCounter combines with numbers or LevelCounters, not {type(other).__name__}")
        if multiply:
            self.tally["ct_pt"] += 1
        return LevelCounter(self.level + multiply, self.tally)

    def __add__(self, other):
        return self._combine(other, multiply=False)

    def __sub__(self, other):
        return self._combine(other, multiply=False)

    def __mul__(self, other):
        return self._combine(other, multiply=True)

    __radd__ = __add__
    __rsub__ = __sub__
    __rmul__ = __mul__

    def __neg__(self):
        return self


# ---------------------------------------------------------------------------------------------
# Circuits (operators only)
# ---------------------------------------------------------------------------------------------


NEGLIGIBLE_COEFFICIENT = 1e-12


def chebyshev_series(t, coefficients: list[float]):
    """`Σ_k c_k T_k(t)` for `t` in [-1, 1], depth `ceil(log2 d) + 1` for degree `d >= 1`.

    `T_k` comes from the product tree `T_{h+l} = 2 T_h T_l - T_{h-l}` (h the largest power of two
    below k), so `T_k` sits at depth `ceil(log2 k)` and costs one ct×ct; the factor 2 is an
    addition. The Chebyshev basis stays bounded by 1 where the power basis would need huge,
    cancelling coefficients.
    """
    degree = len(coefficients) - 1
    if degree == 0:
        return coefficients[0]
    basis = {1: t}
    for k in range(2, degree + 1):
        high = 1 << (k.bit_length() - 1)
        if high == k:  # T_{2h} = 2 T_h^2 - 1
            half = basis[k // 2] * basis[k // 2]
            basis[k] = half + half - 1.0
        else:
            low = k - high
            product = basis[high] * basis[low]
            basis[k] = product + product - basis[high - low]
    total = None
    for k in range(1, degree + 1):
        # Terms below 1e-12 (an odd function's even coefficients, ...) are rounding noise of the fit:
        # dropped on both sides, since a CKKS scalar that small encodes to an all-zero plaintext.
        if abs(coefficients[k]) > NEGLIGIBLE_COEFFICIENT:
            term = coefficients[k] * basis[k]
            total = term if total is None else total + term
    return total + coefficients[0] if total is not None else coefficients[0]


def goldschmidt_reciprocal(x, iterations: int, initial_guess):
    """`1/x` by Goldschmidt: `e = 1 - x·y0`, `1/x ≈ y0 · Π_{i<k} (1 + e^(2^i))`.

    Relative error `|e|^(2^k)`; depth `depth(y0) + 1 + k`.
    """
    y, error = initial_guess, None
    for _ in range(iterations):
        error = 1.0 - x * initial_guess if error is None else error * error
        y = y * (1.0 + error)
    return y


def newton_reciprocal(x, iterations: int, initial_guess):
    """`1/x` by Newton's iteration `y ← y·(2 − x·y)`: relative error squares, two levels a step."""
    y = initial_guess
    for _ in range(iterations):
        y = y * (2.0 - x * y)
    return y


def newton_inverse_sqrt(x, iterations: int, initial_guess):
    """`1/sqrt(x)` by Newton's iteration `y ← y·(1.5 − (x/2)·y²)`: three levels a step."""
    y = initial_guess
    half_x = 0.5 * x if iterations else None
    for _ in range(iterations):
        y = y * (1.5 - half_x * (y * y))
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


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}; transformers knows {sorted(ACT2FN)}")
    return ACT2FN[name]


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

    Call it on a tensor (computed in float64, returned in the input dtype); `circuit` is the
    operator-only form any backend can run.
    """

    kind: str
    error_kind: str  # "relative" or "absolute"

    def __init__(self, domain):
        self.domain = _check_domain(self.kind, domain)
        self.max_error = self.sweep_error(SWEEP_POINTS)

    def circuit(self, x):
        raise NotImplementedError

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        """Declared multiplicative depth (levels consumed)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.circuit(x.double())
        if not isinstance(out, torch.Tensor):  # a constant circuit (no iterations from a constant guess)
            out = torch.full_like(x, out, dtype=torch.float64)
        return out.to(x.dtype)

    def measure(self) -> dict[str, int]:
        """Depth and multiplication counts measured by running the circuit on a `LevelCounter`."""
        out = self.circuit(LevelCounter())
        level = out.level if isinstance(out, LevelCounter) else 0
        tally = out.tally if isinstance(out, LevelCounter) else {"ct_ct": 0, "ct_pt": 0}
        return {"depth": level, **tally}

    def sweep(self, points: int) -> torch.Tensor:
        low, high = self.domain
        if self.error_kind == "relative":  # positive domains spanning decades: sweep on a log scale
            grid = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64, device="cpu")
        else:
            grid = torch.linspace(low, high, points, dtype=torch.float64, device="cpu")
        grid[0], grid[-1] = low, high
        return grid

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        approx, exact = self.circuit(x), self.exact(x)
        difference = (approx - exact).abs()
        return difference / exact.abs() if self.error_kind == "relative" else difference

    def sweep_error(self, points: int) -> float:
        """The max error over `points` spread over the domain."""
        return float(self.errors(self.sweep(points)).max())

    def describe(self) -> dict[str, Any]:
        return {**self.spec(), **self.measure(), "max_error": self.max_error, "error_kind": self.error_kind}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()}, depth={self.depth}, max_error={self.max_error:.2e})"


class ChebyshevApproximation(Approximation):
    """A least-squares Chebyshev polynomial of `degree` for an activation on [low, high]."""

    kind = "activation"
    error_kind = "absolute"

    def __init__(self, function: str, degree: int, domain):
        self.function = function
        self.degree = _check_count(self.kind, "degree", degree, 1)
        self._target = _activation(function)
        low, high = _check_domain(self.kind, domain)
        self.coefficients = fit_chebyshev(self._target, low, high, degree)
        super().__init__(domain)

    def exact(self, x):
        return self._target(x)

    def circuit(self, x):
        low, high = self.domain
        t = (2.0 / (high - low)) * x - (high + low) / (high - low)  # one ct×pt: map to [-1, 1]
        return chebyshev_series(t, self.coefficients)

    @property
    def depth(self) -> int:
        return 1 + math.ceil(math.log2(self.degree)) + 1

    def spec(self):
        return {"kind": self.kind, "function": self.function, "degree": self.degree, "domain": list(self.domain)}


class _IterativeApproximation(Approximation):
    """An iteration from a Chebyshev initial guess of `init_degree` (0: the best constant)."""

    error_kind = "relative"
    method: str

    def __init__(self, iterations: int | None, domain, init_degree: int = 0, tolerance: float = 1e-3):
        low, high = _check_domain(self.kind, domain)
        self.init_degree = _check_count(self.kind, "init_degree", init_degree, 0)
        self.domain = (low, high)
        self.init_coefficients = self._fit_initial_guess(low, high)
        initial_error = self._initial_errors(self.sweep(SWEEP_POINTS))
        if not (initial_error.abs() < 1).all():
            raise ValueError(
                f"{self.kind}: the degree-{self.init_degree} initial guess does not converge on [{low}, {high}] "
                f"(max |1 - x·y0| = {float(initial_error.abs().max()):.3f}); use init_degree=0"
            )
        if iterations is None:
            iterations = self._iterations_for(tolerance)
        self.iterations = _check_count(self.kind, "iterations", iterations, 0)
        super().__init__(domain)

    def _iterations_for(self, tolerance: float, limit: int = 40) -> int:
        for k in range(limit + 1):
            self.iterations = k
            if self.sweep_error(2049) <= tolerance:
                return k
        return limit

    def initial_guess(self, x):
        if self.init_degree == 0:
            return self.init_coefficients[0]
        low, high = self.domain
        t = (2.0 / (high - low)) * x - (high + low) / (high - low)
        return chebyshev_series(t, self.init_coefficients)

    def _initial_depth(self) -> int:
        return 0 if self.init_degree == 0 else 2 + math.ceil(math.log2(self.init_degree))

    def spec(self):
        return {
            "kind": self.kind,
            "method": self.method,
            "iterations": self.iterations,
            "init_degree": self.init_degree,
            "domain": list(self.domain),
        }


class ReciprocalApproximation(_IterativeApproximation):
    """`1/x` on a positive [low, high] by Goldschmidt (depth `1 + k`) or Newton (depth `2k`)."""

    kind = "reciprocal"

    def __init__(self, domain, iterations: int | None = None, method: str = "goldschmidt", **kwargs):
        if method not in RECIPROCAL_METHODS:
            raise ValueError(f"reciprocal: method must be one of {RECIPROCAL_METHODS}, got {method!r}")
        self.method = method
        super().__init__(iterations, domain, **kwargs)

    def _fit_initial_guess(self, low, high):
        if self.init_degree == 0:
            return [2.0 / (low + high)]  # minimises max |1 - c·x| over the domain
        return fit_chebyshev(lambda x: 1.0 / x, low, high, self.init_degree, relative=True)

    def _initial_errors(self, x):
        return 1.0 - x * self.initial_guess(x)

    def exact(self, x):
        return 1.0 / x

    def rescaled(self, factor: float) -> "ReciprocalApproximation":
        """The same iteration for inputs multiplied by `factor`: `1/(factor·x)` on `factor·domain`.

        Relative errors are unchanged (the initial guess scales by `1/factor`), so a backend with
        a bounded value range can evaluate `1/x` as `(factor·num)·(1/(factor·den))` with neither
        factor as large as `1/x` itself.
        """
        low, high = self.domain
        return ReciprocalApproximation(
            [low * factor, high * factor], iterations=self.iterations, method=self.method, init_degree=self.init_degree
        )

    def circuit(self, x):
        iterate = goldschmidt_reciprocal if self.method == "goldschmidt" else newton_reciprocal
        return iterate(x, self.iterations, self.initial_guess(x))

    @property
    def depth(self) -> int:
        start = self._initial_depth()
        if self.method == "goldschmidt":
            return start + 1 + self.iterations if self.iterations else start
        return start + 2 * self.iterations


class InverseSqrtApproximation(_IterativeApproximation):
    """`1/sqrt(x)` on a positive [low, high] by Newton's iteration (depth `3k` from a constant)."""

    kind = "inv_sqrt"
    method = "newton"

    def __init__(self, domain, iterations: int | None = None, method: str = "newton", **kwargs):
        if method != "newton":
            raise ValueError(f"inv_sqrt: method must be 'newton', got {method!r}")
        super().__init__(iterations, domain, **kwargs)

    def _fit_initial_guess(self, low, high):
        if self.init_degree == 0:
            return [math.sqrt(2.0 / (low + high))]  # minimises max |1 - x·c²| over the domain
        return fit_chebyshev(lambda x: x.rsqrt(), low, high, self.init_degree, relative=True)

    def _initial_errors(self, x):
        y = self.initial_guess(x)
        return 1.0 - x * y * y

    def exact(self, x):
        return x.rsqrt()

    def circuit(self, x):
        return newton_inverse_sqrt(x, self.iterations, self.initial_guess(x))

    @property
    def depth(self) -> int:
        return self._initial_depth() + 3 * self.iterations


def build_approximation(spec: dict[str, Any], activation: str | None = None) -> Approximation:
    """An approximation from its plain-data `spec` (as stored in `config.polynomial`)."""
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
        return ChebyshevApproximation(function, domain=domain, **spec)
    raise ValueError(f"unknown approximation kind {kind!r}; expected one of {KINDS}")


__all__ = [
    "Approximation",
    "ChebyshevApproximation",
    "InverseSqrtApproximation",
    "LevelCounter",
    "ReciprocalApproximation",
    "build_approximation",
    "chebyshev_series",
    "fit_chebyshev",
    "goldschmidt_reciprocal",
    "newton_inverse_sqrt",
    "newton_reciprocal",
]
