"""The client: the only holder of the secret key."""

import hashlib

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from .matmul import SealBackend
from .params import CKKSParameters


class CKKSClient:
    """Makes the keys, encrypts, decrypts, and answers refresh requests.

    The server gets `public_context()`: the public, relinearisation and Galois keys, never the
    secret key. A refresh decrypts and re-encrypts exactly what the server sent: values the
    server has masked with uniform noise, so the client sees the activations only through a
    statistical hiding of about 11 bits per value (`refresh.ClientRoundTrip` states the bound).
    """

    def __init__(self, params: CKKSParameters | None = None):
        self.params = params or CKKSParameters()
        self._context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=self.params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(self.params.coeff_mod_bit_sizes),
            # An asymmetric context, so the server gets a public key: TenSEAL's own matmul (the
            # fallback for shapes BSGS does not take) encrypts internally and fails without one.
        )
        self._context.global_scale = 2.0**self.params.scale_bits
        self._context.generate_galois_keys()
        self._context.generate_relin_keys()
        self._public = self._context.serialize(save_secret_key=False, save_galois_keys=True, save_relin_keys=True)
        # The client itself encrypts with its secret key, on raw SEAL: twice as fast as TenSEAL's
        # public-key encryption, same ciphertexts to everyone else.
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
        ciphertext = sealapi.Ciphertext()
        self._encryptor.encrypt_symmetric(plain, ciphertext)
        return self.key_id + self._seal.serialize(ciphertext, len(values))

    def decrypt(self, ciphertext: bytes) -> np.ndarray:
        return np.asarray(ts.ckks_vector_from(self._context, untag(ciphertext, self.key_id)).decrypt())

    def refresh(self, masked: bytes) -> bytes:
        """Decrypt and re-encrypt at the top level, nothing computed on the (masked) values."""
        self.refreshes += 1
        return self.encrypt(self.decrypt(masked))


KEY_ID_BYTES = 16


def key_id(public_context: bytes) -> bytes:
    """A fingerprint of the public keys: ciphertexts carry it, so one made under other keys (which
    CKKS itself cannot tell apart when the parameters match) is refused instead of decrypting to noise."""
    return hashlib.sha256(public_context).digest()[:KEY_ID_BYTES]


def untag(ciphertext: bytes, expected: bytes) -> bytes:
    if ciphertext[:KEY_ID_BYTES] != expected:
        raise ValueError("not a ciphertext of this context (its key id differs): it was made under other keys")
    return ciphertext[KEY_ID_BYTES:]
