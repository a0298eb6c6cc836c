"""Model storage: weight files fetched from where a model's source says, verified, into a cache.

KServe's storage initializer, for inferline: each model may name a source (``https://``,
``hf://``, ``s3://``, ``gs://``, ``pvc://``, ``file://``) and a sha256. ``inferline
fetch-models`` (an init container in the Helm chart) copies each into the cache folder the
inference stage reads as ``INFERLINE_MODEL_DIR``, so the stage itself never needs the network.

Why the care: a weights file is trusted code (ultralytics checkpoints are pickles), so a file
lands under its final name only after its sha256 matched (written to a ``.part`` file, hashed,
then renamed atomically), and a mismatch leaves nothing behind. A store that cannot be reached
is retried with capped exponential backoff, so an init container waits for it with a clear log
line instead of crash-looping; a wrong checksum or a missing object is not retried.

What each scheme does, exactly (no cloud SDK is needed or imported; docs/deployment.md):

- ``https://`` / ``http://``: a GET, resumed with a Range request where the server allows it.
- ``hf://<org>/<repo>[@<revision>]/<path>``: the Hub's ``resolve`` URL (``HF_ENDPOINT``
  overrides the host); ``HF_TOKEN`` is sent as a bearer token (private and gated repos).
- ``s3://<bucket>/<key>``: a GET of the object's HTTPS URL (``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL``, path style, for MinIO and other S3-compatible stores; else the bucket's
  virtual-host URL in ``AWS_REGION``), SigV4-signed with keys from the environment or IRSA's web
  identity exchanged at STS; unsigned without either (public objects).
- ``gs://<bucket>/<object>``: a GET of ``https://storage.googleapis.com/<bucket>/<object>``
  (``STORAGE_EMULATOR_HOST`` overrides the host) with ``GOOGLE_OAUTH_ACCESS_TOKEN``, else the GKE
  metadata server's token (workload identity), else anonymous.
- ``pvc://<claim>/<path>``: the file at ``<pvc root>/<claim>/<path>``, where the chart mounts the
  claim read-only (offline clusters); ``file:///<path>``: a local file. Both are copied and
  verified like a download.
- ``oci://``: not supported (a clear error).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import yaml

from inferline.common.errors import ConfigError, WeightsError
from inferline.services.inference.repository import parse_sha256
from inferline.services.inference.weights import sha256_of

log = logging.getLogger(__name__)

SCHEMES = ("https", "http", "hf", "s3", "gs", "pvc", "file")
EXPORTS = ("onnx",)
_CHUNK = 1 << 20


class FetchError(WeightsError):
    """A fetch that retrying will not fix: a wrong checksum, a missing object, a refused token."""


class StoreUnavailable(FetchError):
    """The store did not answer (refused, timed out, 5xx, 429): worth retrying."""


@dataclass(frozen=True)
class ModelSource:
    """Where one model's weights come from and what they must hash to."""

    model: str
    uri: str
    # The file's name in the cache (what the model config's ``weights.file`` names).
    file: str
    sha256: str | None = None
    # Convert after the fetch ("onnx": the model's ONNX file beside it, for the ONNX Runtime images).
    export: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """How long a store that does not answer is waited for; ``attempts`` 0 waits for ever (an init
    container: the pod stays in Init, saying why, instead of crash-looping)."""

    attempts: int = 0
    backoff_s: float = 2.0
    max_backoff_s: float = 300.0
    timeout_s: float = 60.0


def load_sources(path: Path) -> list[ModelSource]:
    """``sources.yaml``: ``{<model>: {uri, sha256, file, export}}``, as the chart renders it."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read model sources {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model sources {path}: expected a mapping of model name to source")
    return [parse_source(str(model), entry, where=str(path)) for model, entry in raw.items()]


def parse_source(model: str, entry: Any, *, where: str) -> ModelSource:
    if not isinstance(entry, dict) or not entry.get("uri"):
        raise ConfigError(f"{where}: model {model!r} needs a uri (e.g. https://.../{model}.pt)")
    uri = str(entry["uri"])
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme not in SCHEMES:
        supported = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(
            f"{where}: model {model!r}: source {uri!r} has an unsupported scheme "
            f"(supported: {supported}; for an oci:// artifact give an https:// URL of the file)"
        )
    file = str(entry.get("file") or Path(urllib.parse.urlsplit(uri).path).name)
    if not file or "/" in file or file.startswith("."):
        raise ConfigError(f"{where}: model {model!r}: file {file!r} must be a plain file name")
    export = entry.get("export")
    if export is not None and export not in EXPORTS:
        raise ConfigError(f"{where}: model {model!r}: export {export!r} is not one of {', '.join(EXPORTS)}")
    sha256 = None
    if entry.get("sha256"):
        pin = str(entry["sha256"])
        sha256 = parse_sha256(pin if ":" in pin else f"sha256:{pin}", f"{where}: model {model!r} sha256")
    if export is not None and sha256 is None:
        # Exporting unpickles the checkpoint: only a file whose digest the source pins.
        raise ConfigError(f"{where}: model {model!r}: export needs the source's sha256 (the file is unpickled)")
    return ModelSource(model=model, uri=uri, file=file, sha256=sha256, export=export)


@dataclass(frozen=True)
class AwsCredentials:
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Request:
    """What to read for a source: an HTTP(S) URL with its headers (and S3 credentials to sign it
    with, once its last header is known), or a local path."""

    url: str | None = None
    headers: Mapping[str, str] | None = None
    path: Path | None = None
    aws: AwsCredentials | None = None
    region: str = "us-east-1"


def resolve(uri: str, environ: Mapping[str, str], pvc_root: Path, timeout_s: float = 10.0) -> Request:
    """The concrete URL (and credentials) or local path a source URI names."""
    parts = urllib.parse.urlsplit(uri)
    scheme, host, path = parts.scheme, parts.netloc, parts.path.lstrip("/")
    if scheme in ("http", "https"):
        return Request(url=uri, headers={})
    if scheme == "hf":
        org = host
        repo, _, file = path.partition("/")
        name, _, revision = repo.partition("@")
        if not (org and name and file):
            raise FetchError(f"{uri}: expected hf://<org>/<repo>[@<revision>]/<path>")
        endpoint = environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        token = environ.get("HF_TOKEN")
        return Request(
            url=f"{endpoint}/{org}/{name}/resolve/{revision or 'main'}/{file}",
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )
    if scheme == "s3":
        region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        s3_endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
        if s3_endpoint:
            url = f"{s3_endpoint.rstrip('/')}/{host}/{urllib.parse.quote(path)}"
        else:
            url = f"https://{host}.s3.{region}.amazonaws.com/{urllib.parse.quote(path)}"
        return Request(url=url, headers={}, aws=aws_credentials(environ, region, timeout_s), region=region)
    if scheme == "gs":
        endpoint = environ.get("STORAGE_EMULATOR_HOST", "https://storage.googleapis.com").rstrip("/")
        token = environ.get("GOOGLE_OAUTH_ACCESS_TOKEN") or _gce_token(environ)
        return Request(
            url=f"{endpoint}/{host}/{urllib.parse.quote(path)}",
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )
    if scheme == "pvc":
        return Request(path=pvc_root / host / path)
    if scheme == "file":
        return Request(path=Path("/" + path))
    raise FetchError(f"{uri}: unsupported source scheme {scheme!r}")


def fetch(
    source: ModelSource,
    cache_dir: Path,
    *,
    environ: Mapping[str, str],
    pvc_root: Path = Path("/mnt/pvc"),
    timeout_s: float = 60.0,
) -> Path:
    """One attempt: the verified file in ``cache_dir`` (already there and matching: no transfer)."""
    dest = cache_dir / source.file
    if dest.is_file() and (source.sha256 is None or sha256_of(dest) == source.sha256):
        log.info("%s: %s is cached (%s)", source.model, dest, "verified" if source.sha256 else "no sha256 to check")
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    part = cache_dir / f".{source.file}.part"
    request = resolve(source.uri, environ, pvc_root, timeout_s)
    if request.path is not None:
        _copy(source, request.path, part)
    else:
        _download(source, request, part, timeout_s)
    digest = sha256_of(part)
    if source.sha256 is not None and digest != source.sha256:
        part.unlink()
        raise FetchError(
            f"{source.model}: {source.uri} has sha256 {digest}, but the source pins {source.sha256}; nothing was "
            f"cached. Point the source at the file you meant, or, if you trust this one, set its sha256 to {digest}"
        )
    if source.sha256 is None:
        log.warning(
            "%s: %s fetched without a sha256 to check (its sha256 is %s; pin it)", source.model, source.uri, digest
        )
    os.replace(part, dest)
    log.info("%s: fetched %s to %s (sha256 %s)", source.model, source.uri, dest, digest)
    return dest


def fetch_with_retry(
    source: ModelSource,
    cache_dir: Path,
    *,
    environ: Mapping[str, str],
    policy: RetryPolicy = RetryPolicy(),
    pvc_root: Path = Path("/mnt/pvc"),
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """``fetch``, retried while the store is unavailable, with doubling waits up to a cap."""
    attempt = 0
    delay = policy.backoff_s
    while True:
        attempt += 1
        try:
            return fetch(source, cache_dir, environ=environ, pvc_root=pvc_root, timeout_s=policy.timeout_s)
        except StoreUnavailable as exc:
            if policy.attempts and attempt >= policy.attempts:
                raise StoreUnavailable(f"{exc}; gave up after {attempt} attempts") from None
            of = f"of {policy.attempts}" if policy.attempts else "(retrying until it answers)"
            log.warning("%s; attempt %d %s, next in %.0f s", exc, attempt, of, delay)
            sleep(delay)
            delay = min(delay * 2, policy.max_backoff_s)


def fetch_all(
    sources: Iterable[ModelSource],
    cache_dir: Path,
    *,
    environ: Mapping[str, str],
    policy: RetryPolicy = RetryPolicy(),
    pvc_root: Path = Path("/mnt/pvc"),
    exporter: Callable[[ModelSource, Path, Path], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Path]:
    """Every source fetched and verified, and exported where it asks (the exported file is
    written beside, then renamed, as the download is); the paths the inference stage will read."""
    paths = []
    for source in sources:
        path = fetch_with_retry(source, cache_dir, environ=environ, policy=policy, pvc_root=pvc_root, sleep=sleep)
        if source.export is not None:
            out = path.with_suffix(f".{source.export}")
            if not out.is_file():
                if exporter is None:
                    raise FetchError(f"{source.model}: export: {source.export} needs an exporter")
                part = cache_dir / f".{out.stem}.part.{source.export}"
                exporter(source, path, part)
                os.replace(part, out)
                log.info("%s: exported %s to %s", source.model, path, out)
            path = out
        paths.append(path)
    return paths


def _copy(source: ModelSource, path: Path, part: Path) -> None:
    if not path.is_file():
        hint = (
            " (is the claim mounted? the chart mounts each pvc:// claim read-only)"
            if source.uri.startswith("pvc://")
            else ""
        )
        raise FetchError(f"{source.model}: {source.uri}: no file at {path}{hint}")
    shutil.copyfile(path, part)


def _download(source: ModelSource, target: Request, part: Path, timeout_s: float) -> None:
    """GET into ``part``, resuming a previous partial transfer when the server honours Range."""
    assert target.url is not None
    url, headers = target.url, dict(target.headers or {})
    have = part.stat().st_size if part.is_file() else 0
    if have:
        headers["Range"] = f"bytes={have}-"
    if target.aws is not None:
        headers = sign_s3_get(url, headers, target.aws, target.region, datetime.now(UTC))
    shown = _redact(url)
    try:
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 - resolve() gives http(s) URLs only
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - as above
            resumed = have and response.status == 206
            with part.open("ab" if resumed else "wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is already complete (or stale): start over next time
            part.unlink()
            raise StoreUnavailable(f"{source.model}: {shown}: partial download was stale, restarting") from None
        if exc.code >= 500 or exc.code == 429:
            raise StoreUnavailable(f"{source.model}: the store answered HTTP {exc.code} for {shown}") from None
        advice = {
            401: "check the credentials (HF_TOKEN, AWS_*, GOOGLE_OAUTH_ACCESS_TOKEN or the presigned URL)",
            403: "check the credentials or the presigned URL's expiry",
            404: "check the source URI",
        }
        raise FetchError(
            f"{source.model}: the store answered HTTP {exc.code} for {shown}; "
            f"{advice.get(exc.code, 'nothing was cached')}"
        ) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreUnavailable(f"{source.model}: the store at {shown} is unreachable ({reason})") from None


def aws_credentials(environ: Mapping[str, str], region: str, timeout_s: float) -> AwsCredentials | None:
    """Static keys (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, e.g. from a
    Secret), else IRSA's web identity (``AWS_ROLE_ARN`` and ``AWS_WEB_IDENTITY_TOKEN_FILE``, which
    EKS injects for a service account annotated ``eks.amazonaws.com/role-arn``) exchanged at STS
    (``AWS_ENDPOINT_URL_STS`` overrides it); None: unsigned requests (public objects)."""
    if environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY"):
        return AwsCredentials(
            environ["AWS_ACCESS_KEY_ID"], environ["AWS_SECRET_ACCESS_KEY"], environ.get("AWS_SESSION_TOKEN") or None
        )
    role, token_file = environ.get("AWS_ROLE_ARN"), environ.get("AWS_WEB_IDENTITY_TOKEN_FILE")
    if not (role and token_file):
        return None
    sts = (environ.get("AWS_ENDPOINT_URL_STS") or f"https://sts.{region}.amazonaws.com").rstrip("/")
    query = urllib.parse.urlencode(
        {
            "Action": "AssumeRoleWithWebIdentity",
            "Version": "2011-06-15",
            "RoleArn": role,
            "RoleSessionName": "inferline-fetch-models",
            "WebIdentityToken": Path(token_file).read_text().strip(),
        }
    )
    try:
        with urllib.request.urlopen(f"{sts}/?{query}", timeout=timeout_s) as response:  # noqa: S310 - https STS
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise FetchError(
            f"STS refused AssumeRoleWithWebIdentity for {role} (HTTP {exc.code}): check the role's "
            "trust policy and the service account's eks.amazonaws.com/role-arn annotation"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise StoreUnavailable(f"STS at {sts} is unreachable ({getattr(exc, 'reason', exc)})") from None
    found = {el.tag.rsplit("}", 1)[-1]: el.text or "" for el in ElementTree.fromstring(body).iter()}
    return AwsCredentials(found["AccessKeyId"], found["SecretAccessKey"], found.get("SessionToken") or None)


def sign_s3_get(
    url: str, headers: Mapping[str, str], credentials: AwsCredentials, region: str, now: datetime
) -> dict[str, str]:
    """``headers`` plus AWS Signature Version 4 for a GET of ``url`` (S3, header-based auth).
    The payload hash is UNSIGNED-PAYLOAD unless ``x-amz-content-sha256`` is given."""
    parts = urllib.parse.urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    out = {"x-amz-content-sha256": "UNSIGNED-PAYLOAD", **headers, "x-amz-date": amz_date}
    if credentials.session_token:
        out["x-amz-security-token"] = credentials.session_token
    canonical = {name.lower(): " ".join(value.split()) for name, value in out.items()}
    canonical["host"] = parts.netloc
    names = sorted(canonical)
    query = "&".join(
        sorted(
            f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        )
    )
    request = "\n".join(
        [
            "GET",
            parts.path or "/",
            query,
            "".join(f"{n}:{canonical[n]}\n" for n in names),
            ";".join(names),
            canonical["x-amz-content-sha256"],
        ]
    )
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(request.encode()).hexdigest()])
    key = f"AWS4{credentials.secret_key}".encode()
    for part in (amz_date[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return out


def _gce_token(environ: Mapping[str, str]) -> str | None:
    """GKE workload identity: the pod's Google service account token from the metadata server
    (``GCE_METADATA_HOST`` overrides it); None off Google Cloud (then the request is anonymous)."""
    host = environ.get("GCE_METADATA_HOST", "metadata.google.internal")
    request = urllib.request.Request(
        f"http://{host}/computeMetadata/v1/instance/service-accounts/default/token",
        headers={"Metadata-Flavor": "Google"},
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 - as above
            return str(json.load(response)["access_token"])
    except (OSError, ValueError, KeyError) as exc:
        log.debug("no token from the metadata server at %s (%s): anonymous request", host, exc)
        return None


def _redact(url: str) -> str:
    """The URL without its query string: a presigned URL's signature stays out of the logs."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
