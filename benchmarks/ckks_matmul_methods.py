"""Plaintext-matrix × ciphertext products: TenSEAL's `matmul` vs the diagonal method and
baby-step giant-step (BSGS) written on raw SEAL (`tenseal.sealapi`) with pre-encoded diagonals
and Galois keys for only the rotation steps they use.

    python benchmarks/ckks_matmul_methods.py                       # N=8192, the shapes our models use
    python benchmarks/ckks_matmul_methods.py --shapes 64x64 576x576 576x1536

`y = x @ W` for `x` of `rows` values and `W` of `rows × cols`: TenSEAL encrypts `x` repeated
with period `rows` across the slots, so `y = Σ_k rot(x, k) ⊙ d_k` with
`d_k[j] = W[(j + k) mod rows, j]` (k < rows, j < cols) needs no replication step.
Diagonal: `rows - 1` rotations; BSGS: `n1 + n2 - 2 ≈ 2√rows` rotations with
`k = g·n1 + b` and the diagonals pre-rotated by `-g·n1` (plaintexts, free). Rotations are chained
(by 1, and by `n1` in Horner order over the giant steps), so two Galois keys serve any shape. All three consume one
level. Reports seconds per product (best of --repeats) and max error against numpy.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from hf_polyattn.ckks.costs import best_of
from hf_polyattn.ckks.matmul import bsgs, bsgs_split
from hf_polyattn.ckks.seal_backend import SealBackend
from report import command_line, write_results


class RawSeal(SealBackend):
    """The package's raw-SEAL backend on a context with its secret key (the benchmark decrypts
    with raw SEAL to check the products), rotating with Galois keys for exactly `steps`."""

    def __init__(self, ring: int, steps: set[int]):
        context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=ring, coeff_mod_bit_sizes=[60, 40, 40, 60])
        context.global_scale = 2.0**40
        context.generate_galois_keys()  # TenSEAL's own matmul uses the power-of-two set
        super().__init__(context)
        data = context.seal_context().data
        self.decryptor = sealapi.Decryptor(data, context.secret_key().data)
        # Galois keys for exactly the steps used (element = 3^step mod 2N; SEAL wants elements)
        generator = sealapi.KeyGenerator(data, context.secret_key().data)
        self.galois_keys = sealapi.GaloisKeys()
        elements = sorted({pow(3, step, 2 * ring) for step in steps if step})
        generator.create_galois_keys(elements, self.galois_keys)

    def decrypt(self, ct, size: int) -> np.ndarray:
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(ct, plain)
        return np.array(self.encoder.decode_double(plain)[:size])


def diagonals(matrix: np.ndarray) -> list[np.ndarray]:
    """`d_k[j] = W[(j + k) mod rows, j]` for k < rows, j < cols: `y = Σ_k rot(x, k) ⊙ d_k`
    because TenSEAL encrypts `x` repeated with period `rows` across the slots."""
    rows, cols = matrix.shape
    j = np.arange(cols)
    return [matrix[(j + k) % rows, j] for k in range(rows)]


def diagonal_method(seal: RawSeal, ct, plains: list) -> "sealapi.Ciphertext":
    total = seal.multiply_sum(zip(seal.chained_rotations(ct, len(plains)), plains))
    seal.evaluator.rescale_to_next_inplace(total)
    return total


def bsgs_plains(seal: RawSeal, diags: list[np.ndarray], parms_id) -> dict:
    """The diagonals for `matmul.bsgs`, valid on the first `cols` slots: unlike the
    package's `PlaintextMatrix` (full-period diagonals, `rows` dividing the slots), this works
    for any `rows` whose periods of `x` fill the slots the rotations read."""
    rows = len(diags)
    n1, n2 = bsgs_split(rows)
    plains = {}
    for g in range(n2):
        for b in range(n1):
            k = g * n1 + b
            if k >= rows:
                continue
            # rot(Σ_b rot(x, b) ⊙ p_gb, g·n1)[j] = Σ_b x[(j + k) mod rows] · p_gb[j + g·n1]:
            # p_gb is d_k shifted right by g·n1 slots (a plaintext: free)
            shifted = np.zeros(g * n1 + len(diags[k]))
            shifted[g * n1 :] = diags[k]
            plains[(g, b)] = seal.encode(shifted, parms_id)
    return plains


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ring", type=int, default=8192)
    parser.add_argument("--shapes", nargs="+", default=["32x4", "64x4", "64x64", "64x128", "128x64", "576x576", "576x1536"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/ckks_matmul_methods.md"))
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    steps = {1} | {bsgs_split(rows)[0] for rows, _ in shapes}
    seal = RawSeal(args.ring, steps)
    rng = np.random.default_rng(0)
    lines = [
        "| rows × cols | TenSEAL matmul | diagonal (sealapi) | BSGS (sealapi) | BSGS rotations | fastest | max error (TenSEAL / diag / BSGS) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rows, cols in shapes:
        if rows + cols + bsgs_split(rows)[0] > seal.slots - seal.slots % rows:
            print(f"skipping {rows}x{cols}: the slots hold too few periods of x", file=sys.stderr)
            continue
        x, matrix = rng.uniform(-1, 1, rows), rng.uniform(-1, 1, (rows, cols)) / math.sqrt(rows)
        exact = x @ matrix
        vector = ts.ckks_vector(seal.context, x.tolist())
        t_tenseal, out = best_of(args.repeats, lambda: vector.matmul(matrix.tolist()))
        e_tenseal = np.abs(np.array(out.decrypt()) - exact).max()
        diags = diagonals(matrix)
        ct = vector.ciphertext()[0]  # the same ciphertext TenSEAL's matmul starts from
        parms = ct.parms_id()
        plains = [seal.encode(d, parms) for d in diags]  # encoded once: the weights are fixed
        t_diag, out = best_of(args.repeats, lambda: diagonal_method(seal, ct, plains))
        e_diag = np.abs(seal.decrypt(out, cols) - exact).max()
        plains = bsgs_plains(seal, diags, parms)
        t_bsgs, out = best_of(args.repeats, lambda: bsgs(seal, ct, plains, rows))
        e_bsgs = np.abs(seal.decrypt(out, cols) - exact).max()
        n1, n2 = bsgs_split(rows)
        fastest = min((t_tenseal, "TenSEAL"), (t_diag, "diagonal"), (t_bsgs, "BSGS"))[1]
        lines.append(
            f"| {rows} × {cols} | {t_tenseal * 1e3:.0f} ms | {t_diag * 1e3:.0f} ms | {t_bsgs * 1e3:.0f} ms | "
            f"{n1 - 1 + n2 - 1} | {fastest} | {e_tenseal:.1e} / {e_diag:.1e} / {e_bsgs:.1e} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    command = command_line(__file__, argv)
    text = (
        "# Plaintext-matrix × ciphertext: which method wins for which shape\n\n"
        f"Command: `{command}` (TenSEAL {ts.__version__}, N={args.ring}, chain [60, 40, 40, 60], CPU, "
        "2 cores; best of the repeats). Diagonals are encoded once (weights are fixed); the sealapi methods use "
        "Galois keys for exactly their rotation steps.\n\n" + "\n".join(lines) + "\n"
    )
    write_results(args.results, text)


if __name__ == "__main__":
    main()
