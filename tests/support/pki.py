"""A throwaway PKI for TLS tests: a CA and one ECDSA certificate for localhost, made with openssl.

Shared by the deployment TLS tests and the CLI's connection tests, so both dial servers whose
certificates look like cert-manager's (one certificate usable as server and client).
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a localhost certificate it signed (server and client auth, DNS and IP SANs), and a
    second CA that signed nothing: ``cert``, ``key``, ``ca`` and ``other_ca`` paths in ``folder``."""
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(folder / f"{ca}.key"), "-out", str(folder / f"{ca}.crt"), "-days", "2", "-subj",
                 f"/CN=inferline {ca}")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(folder / "tls.key"), "-out", str(folder / "tls.csr"), "-subj", "/CN=localhost")
    _openssl("x509", "-req", "-in", str(folder / "tls.csr"), "-CA", str(folder / "ca.crt"), "-CAkey",
             str(folder / "ca.key"), "-CAcreateserial", "-out", str(folder / "tls.crt"), "-days", "2",
             "-extfile", str(ext))
    return {"cert": folder / "tls.crt", "key": folder / "tls.key", "ca": folder / "ca.crt",
            "other_ca": folder / "other-ca.crt"}
