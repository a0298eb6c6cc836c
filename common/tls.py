"""TLS between the services, from files (a cert-manager Secret in Kubernetes: tls.crt, tls.key, ca.crt).

One certificate per process serves both ways: it is the server's identity on its listener and the
client's identity when the controller dials a stage (mutual TLS). With a CA file, servers require
and verify client certificates and channels verify the server against it; without any TLS
variable everything stays plaintext, as before.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from inferline.common.errors import ConfigError
from inferline.common.settings import Settings


def _read(path: Path, var: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var}={path}: cannot read it ({exc.strerror or exc})") from None


def _identity(settings: Settings) -> tuple[bytes, bytes] | None:
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if (cert is None) != (key is None):
        raise ConfigError("INFERLINE_TLS_CERT_FILE and INFERLINE_TLS_KEY_FILE go together: set both or neither")
    if cert is None or key is None:
        return None
    return _read(key, "INFERLINE_TLS_KEY_FILE"), _read(cert, "INFERLINE_TLS_CERT_FILE")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for this process's listener, or None for plaintext (no certificate, or tls_serve off)."""
    identity = _identity(settings)
    if identity is None or not settings.tls_serve:
        return None
    ca = _read(settings.tls_ca_file, "INFERLINE_TLS_CA_FILE") if settings.tls_ca_file else None
    return grpc.ssl_server_credentials([identity], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS for channels to the other stages (with a CA file), or None for plaintext."""
    if settings.tls_ca_file is None:
        return None
    identity = _identity(settings)
    key, cert = identity if identity else (None, None)
    return grpc.ssl_channel_credentials(_read(settings.tls_ca_file, "INFERLINE_TLS_CA_FILE"), key, cert)
