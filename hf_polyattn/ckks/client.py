"""The client: the only holder of the secret key."""

import hashlib

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from .params import CKKSParameters
from .seal_backend import SealBackend


class RefreshRefused(RuntimeError):
    """A refresh request that is not what an honest server sends (wrong keys, level, scale or size,
    or values beyond the mask's bound). The server is told only "refused", whatever failed."""


class IntegrityError(RuntimeError):
    """A decrypted answer outside what CKKS can hold: a tampered or foreign ciphertext, never logits."""


class CKKSClient:
    """Makes the keys, encrypts, decrypts, and answers refresh requests.

    The server gets `public_context()`: the public, relinearisation and Galois keys, never the
    secret key. A refresh decrypts and re-encrypts exactly what the server sent: values the
    server has masked with uniform noise, so the client sees the activations only through a
    statistical hiding of 7 to 19 bits per value, site by site (`refresh.ClientRoundTrip`).
    It refreshes only what an honest server can send (`refresh`), and every decrypted value is
    checked against the ring's bound (`decrypt`), so a tampered ciphertext is an error, not noise.
    """

    def __init__(self, params: CKKSParameters | None = None):
        self.params = params or CKKSParameters()
        self._context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=self.params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(self.params.coeff_mod_bit_sizes),
            # An asymmetric context, so the server gets a public key: TenSEAL operations that
            # encrypt internally (its own `matmul`, `encrypt_zero`) fail without one.
        )
        self._context.global_scale = 2.0**self.params.scale_bits
        self._context.generate_galois_keys()
        self._context.generate_relin_keys()
        self._public = self._context.serialize(save_secret_key=False, save_galois_keys=True, save_relin_keys=True)
        # The client itself encrypts with its secret key, on raw SEAL: twice as fast as TenSEAL's
        # public-key encryption, and sent seeded (half the bytes); the same ciphertexts to everyone else.
        self._seal = SealBackend(self._context)
        data = self._context.seal_context().data
        self._encryptor = sealapi.Encryptor(data, self._context.secret_key().data)
        self._top = data.first_parms_id()
        self.key_id = key_id(self._public)
        self.refreshes = 0

    def public_context(self) -> bytes:
        """What the server may hold: the context without the secret key."""
        return self._public

    def encrypt(self, values) -> bytes:
        """A ciphertext, tagged with this client's key id (see `key_id`)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        # TenSEAL's layout (the values repeated over every slot), at the top level
        plain = self._seal.encode_repeated(values, self._top)
        # seeded: the second polynomial of a symmetric encryption travels as its seed (half the bytes)
        return self.key_id + self._seal.serialize(self._encryptor.encrypt_symmetric(plain), len(values))

    def decrypt(self, ciphertext: bytes, bound: float | None = None) -> np.ndarray:
        """The values of a ciphertext of this client's keys; `IntegrityError` for any value beyond
        `bound` (default `params.max_magnitude`, what the ring's last level holds: every value of
        a refreshed circuit passes through it, while a flipped byte or a foreign ciphertext
        decrypts to ~1e19-1e31), `ValueError` for bytes that do not parse."""
        values = np.asarray(load_vector(self._context, ciphertext, self.key_id).decrypt())
        self._check_magnitude(values, self.params.max_magnitude if bound is None else bound, IntegrityError)
        return values

    @staticmethod
    def _check_magnitude(values: np.ndarray, bound: float, error: type) -> None:
        if values.size and not (np.isfinite(values).all() and np.abs(values).max() <= bound):
            raise error(f"decrypted values reach {np.abs(values).max():.3g}, beyond the bound {bound:.3g}: "
                        "the ciphertext was tampered with or made under other keys")

    def refresh(self, masked: bytes, max_size: int | None = None) -> bytes:
        """Decrypt and re-encrypt at the top level, nothing computed on the (masked) values.

        Only what an honest server sends is refreshed: a ciphertext of these keys, at the last
        level (refreshes happen when levels run out), at the global scale, of two polynomials,
        of at most `max_size` values (default: the slot count), each within `2 · mask_bound`
        (the mask's range plus the values it hides). Anything else raises `RefreshRefused`, so
        a malicious server cannot use refreshes to decrypt arbitrary ciphertexts, and learns
        one bit (refused) at most before the session ends.
        """
        try:
            vector = load_vector(self._context, masked, self.key_id)
            ciphertext = vector.ciphertext()[0]
            data = self._context.seal_context().data.get_context_data(ciphertext.parms_id())
            if data is None or data.chain_index() != 0:
                raise ValueError("not at the last level")
            if abs(np.log2(ciphertext.scale) - self.params.scale_bits) > 1:
                raise ValueError(f"scale 2^{np.log2(ciphertext.scale):.1f}, not 2^{self.params.scale_bits}")
            if ciphertext.size() != 2:
                raise ValueError(f"{ciphertext.size()} polynomials (not relinearised)")
            largest = max_size or self.params.slots
            if vector.size() > largest:
                raise ValueError(f"{vector.size()} values, more than {largest}")
            values = np.asarray(vector.decrypt())
            self._check_magnitude(values, 2 * self.params.mask_bound, ValueError)
        except Exception as error:  # noqa: BLE001  (every failure is the same refusal)
            raise RefreshRefused(f"refused a refresh request: {error}") from error
        self.refreshes += 1
        return self.encrypt(values)


KEY_ID_BYTES = 16


def key_id(public_context: bytes) -> bytes:
    """A fingerprint of the public keys: ciphertexts carry it, so one made under other keys (which
    CKKS itself cannot tell apart when the parameters match) is refused instead of decrypting to noise."""
    return hashlib.sha256(public_context).digest()[:KEY_ID_BYTES]


def load_vector(context: ts.Context, ciphertext: bytes, expected_key_id: bytes) -> ts.CKKSVector:
    """The TenSEAL vector of a tagged ciphertext: `ValueError` for other keys' or unparsable bytes."""
    payload = untag(ciphertext, expected_key_id)
    try:
        return ts.ckks_vector_from(context, payload)
    except Exception as error:  # noqa: BLE001  (TenSEAL raises bare errors on bad bytes)
        raise ValueError(f"not a ciphertext of this context: {error}") from error


def untag(ciphertext: bytes, expected: bytes) -> bytes:
    if ciphertext[:KEY_ID_BYTES] != expected:
        raise ValueError("not a ciphertext of this context (its key id differs): it was made under other keys")
    return ciphertext[KEY_ID_BYTES:]
