"""A model's polynomial form fitted to the CKKS ring it will run on: the fewest refreshes.

`to_polynomial` picks, site by site, the shallowest circuit meeting the tolerance. On an
interactive ring every ciphertext that runs out of levels costs a refresh round trip, and the
shallowest circuits are wide (a degree-31 guess refreshes many intermediates), so for the ring
a deeper, narrower choice is often cheaper: `fit_to_ring` re-chooses the "auto" reciprocal and
inverse-square-root sites for the ring's levels and what its plan adds (`server.circuit_options`),
with the same domains and tolerance (`modeling.refresh_choice`). The model itself changes, so its
plaintext polynomial form and a server built from it stay one circuit.
"""

from ..modeling.refresh_choice import choose_for_refreshes
from .params import CKKSParameters
from .server import circuit_options


def fit_to_ring(model, params: CKKSParameters | None = None, max_block_depth: int | None = None,
                kv_copies: int | None = None, progress: bool = True):
    """Re-choose `model`'s iterative approximations (in calibrated polynomial form) for the fewest
    refreshes on `params`' ring (default: `CKKSParameters()`), each decoder block within
    `max_block_depth` levels where possible; `kv_copies` as the server will be given it. Updates
    `model.config.polynomial` (saved with the model; `fit` records the ring) and returns `model`."""
    params = params or CKKSParameters()
    options = circuit_options(params, refreshes=True, kv_copies=kv_copies)
    chosen = choose_for_refreshes(model, params.levels, max_block_depth, options, progress)
    spec = model.config.polynomial
    fit = {"levels_per_refresh": params.levels, "slots": params.slots, "scale_bits": params.scale_bits,
           "max_block_depth": max_block_depth}
    model.config.polynomial = {**spec, "sites": {**spec["sites"], **chosen}, "fit": fit}
    return model


__all__ = ["fit_to_ring"]
