"""CKKS (TenSEAL) backend: the client holds the secret key, the server evaluates on ciphertexts.

TenSEAL stays behind this package's small interface (`CKKSClient`, `CKKSServer`, `Cipher`, a
`Refresher` strategy), so a backend with bootstrapping can be added later.
"""

from .cipher import Cipher, CipherEngine
from .client import CKKSClient
from .client_model import client_model
from .params import CKKSParameters
from .profiler import LatencyProfiler
from .refresh import ClientRoundTrip, Refresher
from .remote import RemoteServer, ServerProcess
from .ring_fit import fit_to_ring
from .server import CKKSServer
from .service import SecureService, ServiceLimits
from .session import SecureSession

__all__ = [
    "CKKSClient",
    "CKKSParameters",
    "CKKSServer",
    "Cipher",
    "CipherEngine",
    "ClientRoundTrip",
    "LatencyProfiler",
    "Refresher",
    "RemoteServer",
    "SecureService",
    "SecureSession",
    "ServerProcess",
    "client_model",
    "fit_to_ring",
    "ServiceLimits",
]
