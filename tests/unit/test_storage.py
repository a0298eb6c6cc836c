"""Model storage (services/inference/storage.py, `inferline fetch-models`): a source is fetched
from a local HTTP server standing in for the object store, verified, cached and renamed into
place; a wrong checksum leaves nothing; a store that is down is retried with backoff, then named."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from inferline.common.errors import ConfigError
from inferline.services.cli import main
from inferline.services.inference.storage import (
    AwsCredentials,
    FetchError,
    ModelSource,
    RetryPolicy,
    StoreUnavailable,
    fetch,
    fetch_all,
    fetch_with_retry,
    load_sources,
    resolve,
    sign_s3_get,
)
from inferline.services.inference.weights import sha256_of
from tests.deploy.tools import free_port

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
NO_ENV: dict[str, str] = {}


@dataclass
class Store:
    """An object store on 127.0.0.1: files by path, Range requests, and failures on demand."""

    url: str
    files: dict[str, bytes]
    requests: list[dict[str, str]] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)  # HTTP statuses to answer first


@pytest.fixture
def store() -> Iterator[Store]:
    state = Store(url="", files={"/models/yolov8n.pt": PAYLOAD})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            if state.fail_next:
                self.send_error(state.fail_next.pop(0))
                return
            body = state.files.get(self.path.split("?")[0])
            if body is None:
                self.send_error(404)
                return
            start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def _source(uri: str, sha256: str | None = DIGEST, **kw: str) -> ModelSource:
    return ModelSource(model="yolov8n", uri=uri, file="yolov8n.pt", sha256=sha256, **kw)  # type: ignore[arg-type]


def test_https_source_is_fetched_verified_and_then_served_from_the_cache(store, tmp_path):
    source = _source(f"{store.url}/models/yolov8n.pt")
    path = fetch(source, tmp_path, environ=NO_ENV)
    assert path == tmp_path / "yolov8n.pt" and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["yolov8n.pt"]  # no .part left over
    fetch(source, tmp_path, environ=NO_ENV)
    assert len(store.requests) == 1, "a cached file that matches its sha256 is not fetched again"


def test_cached_file_that_does_not_match_is_fetched_again(store, tmp_path):
    (tmp_path / "yolov8n.pt").write_bytes(b"tampered")
    fetch(_source(f"{store.url}/models/yolov8n.pt"), tmp_path, environ=NO_ENV)
    assert (tmp_path / "yolov8n.pt").read_bytes() == PAYLOAD and len(store.requests) == 1


def test_wrong_sha256_is_refused_naming_both_digests_and_nothing_is_cached(store, tmp_path):
    wrong = "0" * 64
    with pytest.raises(FetchError) as raised:
        fetch(_source(f"{store.url}/models/yolov8n.pt", sha256=wrong), tmp_path, environ=NO_ENV)
    assert not isinstance(raised.value, StoreUnavailable)
    assert DIGEST in str(raised.value) and wrong in str(raised.value) and "nothing was cached" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_store_down_is_retried_with_doubling_backoff_then_named(tmp_path):
    waits: list[float] = []
    policy = RetryPolicy(attempts=4, backoff_s=1.0, max_backoff_s=3.0, timeout_s=5.0)
    source = _source(f"http://127.0.0.1:{free_port()}/models/yolov8n.pt")
    with pytest.raises(StoreUnavailable) as raised:
        fetch_with_retry(source, tmp_path, environ=NO_ENV, policy=policy, sleep=waits.append)
    assert waits == [1.0, 2.0, 3.0]
    message = str(raised.value)
    assert "yolov8n" in message and "unreachable" in message and "gave up after 4 attempts" in message
    assert list(tmp_path.iterdir()) == []


def test_store_that_comes_back_is_waited_for_without_a_limit(store, tmp_path, caplog):
    store.fail_next = [503, 503, 429]
    waits: list[float] = []
    path = fetch_with_retry(
        _source(f"{store.url}/models/yolov8n.pt"),
        tmp_path,
        environ=NO_ENV,
        policy=RetryPolicy(attempts=0, backoff_s=0.5),
        sleep=waits.append,
    )
    assert path.read_bytes() == PAYLOAD and waits == [0.5, 1.0, 2.0]
    assert "HTTP 503" in caplog.text and "retrying until it answers" in caplog.text


def test_missing_object_is_not_retried(store, tmp_path):
    waits: list[float] = []
    with pytest.raises(FetchError, match="HTTP 404.*check the source URI"):
        fetch_with_retry(_source(f"{store.url}/models/nope.pt"), tmp_path, environ=NO_ENV, sleep=waits.append)
    assert waits == []


def test_partial_download_resumes_with_a_range_request(store, tmp_path):
    (tmp_path / ".yolov8n.pt.part").write_bytes(PAYLOAD[:1000])
    path = fetch(_source(f"{store.url}/models/yolov8n.pt"), tmp_path, environ=NO_ENV)
    assert path.read_bytes() == PAYLOAD
    assert store.requests[0]["range"] == "bytes=1000-"


def test_presigned_query_string_stays_out_of_errors(tmp_path):
    port = free_port()
    with pytest.raises(StoreUnavailable) as raised:
        fetch(_source(f"http://127.0.0.1:{port}/b/yolov8n.pt?X-Amz-Signature=secret"), tmp_path, environ=NO_ENV)
    assert "secret" not in str(raised.value) and f"127.0.0.1:{port}/b/yolov8n.pt" in str(raised.value)


def test_s3_source_reads_an_s3_compatible_endpoint_from_the_environment(store, tmp_path):
    store.files["/weights-bucket/v1/yolov8n.pt"] = PAYLOAD
    path = fetch(_source("s3://weights-bucket/v1/yolov8n.pt"), tmp_path, environ={"AWS_ENDPOINT_URL": store.url})
    assert path.read_bytes() == PAYLOAD and store.requests[0]["path"] == "/weights-bucket/v1/yolov8n.pt"


def test_hf_source_resolves_a_revision_and_sends_hf_token(store, tmp_path):
    store.files["/ultralytics/yolov8/resolve/v1/yolov8n.pt"] = PAYLOAD
    environ = {"HF_ENDPOINT": store.url, "HF_TOKEN": "hf_abc"}
    fetch(_source("hf://ultralytics/yolov8@v1/yolov8n.pt"), tmp_path, environ=environ)
    assert store.requests[0]["authorization"] == "Bearer hf_abc"


def test_gs_source_sends_the_oauth_token_from_the_environment(store, tmp_path):
    store.files["/bucket/dir/yolov8n.pt"] = PAYLOAD
    environ = {"STORAGE_EMULATOR_HOST": store.url, "GOOGLE_OAUTH_ACCESS_TOKEN": "ya29.x"}
    fetch(_source("gs://bucket/dir/yolov8n.pt"), tmp_path, environ=environ)
    assert store.requests[0]["authorization"] == "Bearer ya29.x"


def test_cloud_uris_map_to_their_public_https_endpoints_without_overrides():
    assert (
        resolve("s3://b/k/y.pt", {"AWS_REGION": "eu-west-1"}, Path("/p")).url
        == "https://b.s3.eu-west-1.amazonaws.com/k/y.pt"
    )
    no_metadata = {"GCE_METADATA_HOST": f"127.0.0.1:{free_port()}"}  # off Google Cloud: anonymous
    gs = resolve("gs://b/k/y.pt", no_metadata, Path("/p"))
    assert gs.url == "https://storage.googleapis.com/b/k/y.pt" and gs.headers == {}
    hf = resolve("hf://org/repo/sub/y.pt", {}, Path("/p"))
    assert hf.url == "https://huggingface.co/org/repo/resolve/main/sub/y.pt" and hf.headers == {}


def test_pvc_source_copies_from_the_mounted_claim_and_verifies(tmp_path):
    claim = tmp_path / "pvc" / "models-claim" / "v8"
    claim.mkdir(parents=True)
    (claim / "yolov8n.pt").write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    path = fetch(_source("pvc://models-claim/v8/yolov8n.pt"), cache, environ=NO_ENV, pvc_root=tmp_path / "pvc")
    assert path.read_bytes() == PAYLOAD
    with pytest.raises(FetchError, match="is the claim mounted"):
        fetch(_source("pvc://other/yolov8n.pt"), tmp_path / "c2", environ=NO_ENV, pvc_root=tmp_path / "pvc")


def test_export_runs_on_the_verified_file_and_lands_under_its_final_name(store, tmp_path):
    seen: list[tuple[bytes, str]] = []

    def exporter(source: ModelSource, weights: Path, out: Path) -> None:
        seen.append((weights.read_bytes(), out.name))
        out.write_bytes(b"onnx")

    source = _source(f"{store.url}/models/yolov8n.pt", export="onnx")
    assert fetch_all([source], tmp_path, environ=NO_ENV, exporter=exporter) == [tmp_path / "yolov8n.onnx"]
    assert seen == [(PAYLOAD, ".yolov8n.part.onnx")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["yolov8n.onnx", "yolov8n.pt"]
    fetch_all([source], tmp_path, environ=NO_ENV, exporter=exporter)
    assert len(seen) == 1, "an existing export is kept"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"uri": "oci://ghcr.io/inferline/models:yolov8n"}, "unsupported scheme"),
        ({"sha256": DIGEST}, "needs a uri"),
        ({"uri": "https://h/y.pt", "sha256": "abc"}, "not a sha256 pin"),
        ({"uri": "https://h/y.pt", "export": "onnx"}, "export needs the source's sha256"),
        ({"uri": "https://h/y.pt", "export": "tflite", "sha256": DIGEST}, "export 'tflite'"),
    ],
)
def test_bad_sources_are_refused_naming_the_model(tmp_path, entry, message):
    import yaml  # noqa: PLC0415

    file = tmp_path / "sources.yaml"
    file.write_text(yaml.safe_dump({"yolov8n": entry}))
    with pytest.raises(ConfigError, match=message) as raised:
        load_sources(file)
    assert "yolov8n" in str(raised.value)


def test_fetch_models_command_fetches_every_source_and_prints_the_paths(store, tmp_path, capsys):
    sources = tmp_path / "sources.yaml"
    sources.write_text(f"yolov8n:\n  uri: {store.url}/models/yolov8n.pt\n  sha256: sha256:{DIGEST}\n")
    assert main(["fetch-models", "--sources", str(sources), "--dest", str(tmp_path / "models")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "models" / "yolov8n.pt")


def test_fetch_models_command_exits_1_with_the_reason_when_the_store_stays_down(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INFERLINE_FETCH_BACKOFF_S", "0.01")
    sources = tmp_path / "sources.yaml"
    sources.write_text(f"yolov8n: {{uri: 'http://127.0.0.1:{free_port()}/yolov8n.pt', sha256: '{DIGEST}'}}\n")
    code = main(["fetch-models", "--sources", str(sources), "--dest", str(tmp_path / "m"), "--attempts", "2"])
    assert code == 1
    assert "unreachable" in capsys.readouterr().err


def test_s3_signature_matches_awss_published_get_object_example():
    """AWS's SigV4 documentation, "Example: GET Object" (header-based auth, S3)."""
    credentials = AwsCredentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    headers = sign_s3_get(
        "https://examplebucket.s3.amazonaws.com/test.txt",
        {"Range": "bytes=0-9", "x-amz-content-sha256": empty},
        credentials,
        "us-east-1",
        datetime(2013, 5, 24, tzinfo=UTC),
    )
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_s3_source_with_keys_from_a_secret_is_signed(store, tmp_path):
    store.files["/private/yolov8n.pt"] = PAYLOAD
    environ = {
        "AWS_ENDPOINT_URL": store.url,
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "session",
        "AWS_REGION": "eu-central-1",
    }
    fetch(_source("s3://private/yolov8n.pt"), tmp_path, environ=environ)
    sent = store.requests[0]
    assert sent["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-central-1/s3/aws4_request" in sent["authorization"] and "s3cr3t" not in sent["authorization"]
    assert sent["x-amz-security-token"] == "session" and sent["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"


def test_s3_source_with_irsa_exchanges_the_web_identity_token_at_sts(store, tmp_path):
    token = tmp_path / "token"
    token.write_text("eyJ.projected.jwt\n")
    store.files["/sts/"] = (
        b'<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        b"<AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIAROLE</AccessKeyId>"
        b"<SecretAccessKey>rolesecret</SecretAccessKey><SessionToken>roletoken</SessionToken>"
        b"</Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
    )
    store.files["/bucket/yolov8n.pt"] = PAYLOAD
    environ = {
        "AWS_ENDPOINT_URL": store.url,
        "AWS_ENDPOINT_URL_STS": f"{store.url}/sts",
        "AWS_ROLE_ARN": "arn:aws:iam::111122223333:role/models",
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
    }
    fetch(_source("s3://bucket/yolov8n.pt"), tmp_path / "cache", environ=environ)
    sts, get = store.requests
    assert "Action=AssumeRoleWithWebIdentity" in sts["path"] and "WebIdentityToken=eyJ.projected.jwt" in sts["path"]
    assert get["authorization"].startswith("AWS4-HMAC-SHA256 Credential=ASIAROLE/")
    assert get["x-amz-security-token"] == "roletoken"


def test_gs_source_on_gke_uses_the_metadata_servers_token(store, tmp_path):
    store.files["/computeMetadata/v1/instance/service-accounts/default/token"] = b'{"access_token": "ya29.wi"}'
    store.files["/bucket/yolov8n.pt"] = PAYLOAD
    host = store.url.removeprefix("http://")
    fetch(
        _source("gs://bucket/yolov8n.pt"),
        tmp_path,
        environ={"STORAGE_EMULATOR_HOST": store.url, "GCE_METADATA_HOST": host},
    )
    metadata, get = store.requests
    assert metadata["metadata-flavor"] == "Google" and get["authorization"] == "Bearer ya29.wi"


@pytest.mark.slow
def test_fetch_models_exports_a_verified_checkpoint_to_onnx_as_the_default_install_does(store, tmp_path, yolo_weights):
    """The default install's path (yolov8n.pt fetched, verified, exported), here with the
    stand-in checkpoint on the local store; the export runs in this process, with torch."""
    import onnxruntime  # noqa: PLC0415

    store.files["/v8.4.0/yolov8n.pt"] = yolo_weights.read_bytes()
    sources = tmp_path / "sources.yaml"
    sources.write_text(
        f"yolov8n: {{uri: '{store.url}/v8.4.0/yolov8n.pt', sha256: '{sha256_of(yolo_weights)}', export: onnx}}\n"
    )
    dest = tmp_path / "models"
    assert main(["fetch-models", "--sources", str(sources), "--dest", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["yolov8n.onnx", "yolov8n.pt"]
    session = onnxruntime.InferenceSession(str(dest / "yolov8n.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["output0"]
