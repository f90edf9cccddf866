"""CKKS parameter sets, refused below 128-bit security (TenSEAL's SEAL refuses them too)."""

import math
from dataclasses import dataclass, field

# Largest total coefficient-modulus size (bits) for 128-bit classical security (HE standard,
# as enforced by SEAL) per ring degree.
MAX_COEFF_MODULUS_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


# Largest tolerated ratio of a ring's absolute precision to the smallest attention normaliser the
# server takes 1/x of (after balancing): beyond it the reciprocal's iterations amplify the noise
# (measured: a 30-bit scale on the tiny models, or a d=576 random model with init 0.15 at 2^40,
# ends at errors of 1e8 to 1e21; below 1e-4 the logits stay within 1e-2 of their scale).
PRECISION_LIMIT = 1e-3


def ckks_precision(scale_bits: float, poly_modulus_degree: int) -> float:
    """Typical absolute error of a fresh or refreshed value: `2^-(scale_bits - log2(N) - 5)`."""
    return 2.0 ** -(scale_bits - math.log2(poly_modulus_degree) - 5)


@dataclass(frozen=True)
class CKKSParameters:
    """Ring degree, modulus chain and scale of a CKKS context.

    `levels` multiplications fit between two refreshes: the chain is
    `[first, scale × levels, last]` bits. Values must stay below `2^(first - scale_bits)` in
    magnitude, and are precise to about `2^-(scale_bits - log2(N) - 5)` in absolute terms.
    """

    poly_modulus_degree: int = 8192
    levels: int = 2
    scale_bits: int = 40
    first_bits: int = 60
    coeff_mod_bit_sizes: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        if self.poly_modulus_degree not in MAX_COEFF_MODULUS_BITS_128:
            raise ValueError(
                f"poly_modulus_degree must be one of {sorted(MAX_COEFF_MODULUS_BITS_128)}, got {self.poly_modulus_degree}"
            )
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        if not 20 <= self.scale_bits < self.first_bits <= 60:
            raise ValueError(f"need 20 <= scale_bits < first_bits <= 60, got {self.scale_bits}, {self.first_bits}")
        chain = (self.first_bits, *([self.scale_bits] * self.levels), self.first_bits)
        object.__setattr__(self, "coeff_mod_bit_sizes", chain)
        limit = MAX_COEFF_MODULUS_BITS_128[self.poly_modulus_degree]
        if sum(chain) > limit:  # SEAL enforces the standard: TenSEAL would refuse the context
            raise ValueError(
                f"{sum(chain)} modulus bits at N={self.poly_modulus_degree} is below 128-bit security "
                f"(at most {limit} bits): lower levels or scale_bits, or raise poly_modulus_degree"
            )

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    # The ring's limits, all derived here: what the last modulus holds, what a circuit may produce
    # (half of it: room for an approximation's overshoot and the noise), and the refresh mask.
    @property
    def max_magnitude(self) -> float:
        """Values beyond this overflow the last modulus: no decryption of this ring can be larger."""
        return 2.0 ** (self.first_bits - self.scale_bits - 1)

    @property
    def value_bound(self) -> float:
        """The largest value a circuit on this ring may compute (a server refuses a model whose
        calibrated attention normaliser needs more)."""
        return self.max_magnitude / 2

    @property
    def mask_bound(self) -> float:
        """`R`, the range of a refresh mask: the server adds `r ∈ [-R, R]` to values `|x| ≤ R`, so
        the client decrypts `|x + r| ≤ 2R`, half of `value_bound` (R = 2^16 for the default ring)."""
        return self.value_bound / 4

    @property
    def precision(self) -> float:
        return ckks_precision(self.scale_bits, self.poly_modulus_degree)

    @property
    def security(self) -> str:
        return "128-bit"  # the only level __post_init__ accepts

    @classmethod
    def from_context(cls, context) -> "CKKSParameters":
        """The parameters of a TenSEAL context (e.g. a client's public one, on a server); a chain
        this class does not describe (`[first, scale × levels, first]`) is refused."""
        key_data = context.seal_context().data.key_context_data()
        chain = tuple(modulus.bit_count() for modulus in key_data.parms().coeff_modulus())
        params = cls(poly_modulus_degree=key_data.parms().poly_modulus_degree(), levels=len(chain) - 2,
                     scale_bits=round(math.log2(context.global_scale)), first_bits=chain[0])
        if params.coeff_mod_bit_sizes != chain:
            raise ValueError(f"a modulus chain {list(chain)} at scale 2^{params.scale_bits}: expected "
                             f"{list(params.coeff_mod_bit_sizes)} ([first, scale × levels, first])")
        return params

    @classmethod
    def max_levels(cls, poly_modulus_degree: int, scale_bits: int = 40, first_bits: int = 60) -> int:
        """The most levels a 128-bit secure chain of this ring degree holds."""
        return (MAX_COEFF_MODULUS_BITS_128[poly_modulus_degree] - 2 * first_bits) // scale_bits
