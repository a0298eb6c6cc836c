"""One settings object for every service, read from ``INFERLINE_*`` environment variables.

It is read once at start-up and passed down; nothing deeper in the code reads the environment.
Each field's variable is ``INFERLINE_`` plus the field name in upper case
(``controller_port`` -> ``INFERLINE_CONTROLLER_PORT``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferline.common.errors import ConfigError

PREFIX = "INFERLINE_"
# The services by name: the controller, and the three stages it calls, in the order a request
# goes through them. Every list of stages (ports, settings, start and stop order, `inferline
# serve`) is these.
CONTROLLER = "controller"
PIPELINE_STAGES = ("preprocess", "inference", "postprocess")
STAGES = (CONTROLLER, *PIPELINE_STAGES)
# The HTTP front door: not a gRPC stage, but it has a port and `inferline serve gateway`.
GATEWAY = "gateway"


@dataclass(frozen=True)
class Settings:
    # Network.
    host: str = "0.0.0.0"
    controller_port: int = 50051
    preprocess_port: int = 50052
    inference_port: int = 50053
    postprocess_port: int = 50054
    preprocess_target: str = "localhost:50052"
    inference_target: str = "localhost:50053"
    postprocess_target: str = "localhost:50054"
    max_message_mb: int = 64
    grace_period_s: float = 10.0
    # Seconds a controller gives the stages when its caller set no deadline.
    default_timeout_s: float = 60.0
    # The controller runs the three stages' code in its own process, without gRPC between them
    # (`inferline serve controller --inprocess`): for measuring what the boundaries cost.
    inprocess: bool = False

    # Faults (docs/reliability-faults.md): retries of UNAVAILABLE between the services (gRPC's
    # retry policy, with a budget of maxTokens: below half of it a channel stops retrying), the
    # drain on SIGTERM (health NOT_SERVING, still accepting for drain_delay_s while callers see
    # it, then grace_period_s for the calls in flight), how often the controller checks its
    # stages, and how long its calls wait for a stage that was serving and went away (restart,
    # rollout) before they fail fast with UNAVAILABLE. `inferline up` restarts a stage that
    # exits with a backoff from restart_backoff_s doubling to restart_max_backoff_s, reset once
    # it has stayed up restart_reset_after_s.
    retry_max_attempts: int = 5
    retry_initial_backoff_s: float = 0.2
    retry_max_backoff_s: float = 2.0
    retry_budget_tokens: int = 100
    drain_delay_s: float = 2.0
    readiness_poll_s: float = 0.5
    stage_outage_wait_s: float = 30.0
    restart_backoff_s: float = 0.5
    restart_max_backoff_s: float = 30.0
    restart_reset_after_s: float = 30.0

    # HTTP gateway (services/gateway): where it listens, where it finds the controller, the
    # largest request body it reads, and the deadline it gives a call without X-Request-Timeout.
    gateway_port: int = 8080
    controller_target: str = "localhost:50051"
    gateway_max_upload_mb: int = 32
    gateway_timeout_s: float = 60.0
    # The OIP server behind the gateway's /v2 routes (REST -> inference.GRPCInferenceService);
    # empty: the controller, over the gateway's channel to it.
    gateway_oip_target: str = ""
    # issue 19: http. The sub-path the gateway is served under when a proxy does not strip it
    # (one that strips it sends X-Forwarded-Prefix instead); API keys (comma-separated, or one
    # per line in a file, e.g. a mounted Secret): empty, no key is required.
    gateway_root_path: str = ""
    gateway_api_keys: str = ""
    gateway_api_keys_file: str = ""

    # TLS between the services (common/tls.py): this process's certificate and key, and the CA
    # that peers' certificates must chain to. tls_serve=false keeps this listener plaintext
    # (a controller behind an ingress) while its channels to the stages still use TLS.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_serve: bool = True

    # Models.
    model_repository: Path | None = None
    # Folders searched for weight files, in order (INFERLINE_MODEL_DIR, os.pathsep-separated).
    model_dir: tuple[Path, ...] = ()
    # Names of the models the inference service loads; empty loads the whole repository.
    models: tuple[str, ...] = ()
    allow_download: bool = True
    # Triton's model control (docs/model-control.md): none loads the repository at start and
    # refuses load/unload calls; explicit loads ``load_models`` at start (``*``: all; Triton's
    # --load-model) and then what RepositoryModelLoad asks; poll rescans the repository folder
    # every ``repository_poll_s`` and loads, reloads and unloads what changed there.
    model_control_mode: str = "none"
    repository_poll_s: float = 5.0
    load_models: tuple[str, ...] = ()
    # Triton's --exit-on-error: a model that fails to load at start stops the stage; otherwise
    # it reads UNAVAILABLE (with its reason) and the other models serve.
    exit_on_error: bool = False
    device: str = "auto"
    torch_threads: int = 0

    # Limits and pools.
    max_batch_images: int = 64
    # Images of one client request that travel through the stages together; a bigger request is
    # split into slices that run concurrently (the first one's inference overlaps the next one's
    # decoding). Smaller: lower latency for big requests; bigger: fewer stage calls.
    pipeline_slice: int = 4
    # Candidate labels (or texts) per Classify/Embed call.
    max_labels: int = 256
    worker_threads: int = 4
    # The inference stage's niceness, applied when it starts (os.nice; every thread it makes,
    # the model's included, inherits it). On one host (`inferline up`), a higher one lets the
    # short stages beside it (decode, NMS, the controller) preempt the model's threads when they
    # wake, instead of waiting out its spinning; the model still gets every idle cycle. Nothing
    # changes under Kubernetes, where each stage's pod is its own cgroup. 0: unchanged.
    inference_nice: int = 0
    # Where the preprocess stage decodes and letterboxes JPEGs: "opencv" (CPU, bit-exact with
    # ultralytics), "cuda" / "cuda:N" (nvJPEG and torch on that GPU), or "torch-cpu" (the GPU
    # path's code on the CPU, for testing it without a GPU). Needs torch unless "opencv".
    preprocess_device: str = "opencv"

    # Input limits (issue 13, validation): every stage checks what it is sent against these,
    # whoever the caller is, before any costly work, and refuses with INVALID_ARGUMENT naming
    # the limit and its variable (docs/reliability.md has the reasons behind each default).
    # Pixels of one image, read from its header before decoding. The served models see at most
    # 640x640 (YOLO), 224x224 (CLIP) or 320..640 (Faster R-CNN); an 8K UHD frame (7680x4320,
    # 33 MP, 100 MB decoded) is the largest input that still makes sense, and bigger ones only
    # cost decode time and memory.
    max_image_pixels: int = 33_177_600
    # Largest side a recipe may ask for (letterbox/clip_image `size`, `stride`): ultralytics'
    # P6 models run at 1280; 2048 (a 12 MB input tensor) leaves room without letting a size of
    # 12000 (432 MB) through.
    max_input_side: int = 2048
    # Regions (crops) per Preprocess call and items per ModelInfer call: a Detect with
    # classify_with crops every box of up to max_batch_images images.
    max_regions: int = 4096
    # Bytes (UTF-8) of one text or label, checked before tokenising: CLIP's 77 tokens hold well
    # under 1 KB of real text.
    max_text_bytes: int = 2048
    # Image vectors per Embeddings call (one per crop of a Detect with classify_with; texts
    # are bounded by max_labels, so zero-shot scores at most 4096 x 256 pairs, under a second)
    # and their width (CLIP ViT-B/32: 512, the biggest open_clip towers: 1280). Clustering
    # compares every pair, iteratively: it has its own, smaller bound.
    max_embeddings: int = 4096
    max_embedding_dim: int = 4096
    max_cluster_items: int = 1024
    # Admission control and overload (issue 13, part "admission"; docs/reliability-admission.md).
    # The controller refuses a request (RESOURCE_EXHAUSTED with a RetryInfo hint) before any
    # stage work when its model's images in flight would pass an adaptive limit, or when the
    # model's observed service rate says it would finish after its deadline (with a margin:
    # expected x admission_deadline_margin must fit). The limit starts at
    # admission_initial_limit and adapts from latency (Vegas) within [min, max].
    admission: bool = True
    admission_initial_limit: int = 8
    admission_min_limit: int = 4
    admission_max_limit: int = 512
    admission_deadline_margin: float = 1.5
    # The limit's floor: the images the model completes in this many seconds at its observed
    # rate (0: the Vegas limit alone, which refuses most of a closed loop past saturation).
    admission_queue_s: float = 3.0
    # How long a request over the limit waits in the controller for room (first come, first
    # served) before it is refused; 0 refuses at once (docs/reliability-admission.md).
    admission_wait_s: float = 1.0
    # The longest retry hint a refusal carries.
    admission_max_retry_s: float = 30.0

    log_level: str = "INFO"

    # Observability (docs/monitoring.md). Prometheus /metrics per stage: 0 picks a free port,
    # a negative port or INFERLINE_METRICS=false serves none.
    metrics: bool = True
    controller_metrics_port: int = 9101
    preprocess_metrics_port: int = 9102
    inference_metrics_port: int = 9103
    postprocess_metrics_port: int = 9104
    # "json": one JSON object per line with trace and request ids; "text" for reading by eye.
    log_format: str = "json"
    # Where the inference stage writes PyTorch profiler traces (`inferline profile`).
    profile_dir: Path = Path("out/profiles")

    # Security defaults and bounded memory (issue 13, part "security"; docs/reliability-security.md).
    # Weight files served although their model config does not trust them, by digest
    # (sha256:<64 hex>, comma-separated): an operator's explicit, logged opt-in, e.g. the stand-ins.
    trusted_weights: tuple[str, ...] = ()
    # POST /debug/profile on the inference stage's metrics port: off unless true, and when
    # true answered only to callers on this host (127.0.0.1 or ::1); /metrics stays open.
    profiling: bool = False
    # glibc malloc (common/memory.py): arenas per process (0: glibc's 8 per core), a fixed mmap
    # threshold in KiB (0: glibc's dynamic one), and seconds without calls after which a stage
    # hands its free heap back to the kernel (0: never). They keep idle RSS where it was
    # before an overload instead of at the overload's peak.
    malloc_arena_max: int = 2
    malloc_mmap_threshold_kb: int = 0
    memory_trim_idle_s: float = 2.0
    # OIP's system shared memory on the inference stage (docs/shared-memory.md): regions a client
    # may register at once, and the bytes they may map together. The client owns the memory;
    # the bound keeps one client from filling this process's address space with mappings.
    shm_max_regions: int = 64
    shm_max_bytes: int = 2 * 1024**3
    # issue 18: monitoring. The price of one CPU core for an hour (any currency; 0: no cost is
    # counted): each stage counts inferline_cost_total{model,stage} from the CPU its requests
    # took, and profiled timings carry <stage>.cost (docs/monitoring.md#cost).
    cost_per_core_hour: float = 0.0
    # The price of one GPU for an hour: a request's GPU seconds (its share of the forward passes
    # that ran on a GPU) count into inferline_cost_total and <stage>.cost at this price.
    cost_per_gpu_hour: float = 0.0

    # issue 18: lb (docs/deployment.md, "Load balancing"). Channels ping an idle connection every
    # keepalive_time_s and drop it when no answer comes in keepalive_timeout_s (a replica that
    # vanished without a FIN leaves round-robin's list in seconds, not at the next call); servers
    # accept those pings. A server closes each connection after max_connection_age_s (gRPC adds
    # +-10% jitter), letting calls in flight finish for max_connection_age_grace_s: the client
    # re-resolves its target then, so new replicas behind a DNS name receive calls. New calls go
    # to the new connection at once, so the grace only bounds long streams (ModelStreamInfer):
    # one lasts at most age + grace. 0: connections never age (gRPC's default). A listed
    # address that does not answer is retried at most every reconnect_max_backoff_s (gRPC's
    # default is 120 s), so a copy that starts there takes calls within that.
    keepalive_time_s: float = 20.0
    keepalive_timeout_s: float = 10.0
    keepalive_permit_without_calls: bool = True
    max_connection_age_s: float = 30.0
    max_connection_age_grace_s: float = 300.0
    reconnect_max_backoff_s: float = 5.0

    # issue 16: shm
    # How preprocessed tensors go preprocess -> controller -> inference: "auto" through the
    # controller's device pool when the preprocess stage works on a GPU (preprocess_device
    # cuda[:N]) and the stages can open it by CUDA IPC, else its shared memory pool when a stage
    # shares this host's /dev/shm, else inline; "cuda" and "shm" the same but that pool must be
    # created at start-up (docs/gpu.md, docs/shared-memory.md); "inline" always as bytes. The
    # device pool has the shm pool's size (shm_pool_slots x shm_slot_bytes).
    tensor_transport: str = "auto"
    # The pool (docs/shared-memory.md): slots of shm_slot_bytes (room for one 640x640 RGB
    # uint8 tensor), reserved in /dev/shm at start-up; a request that finds none free goes inline.
    shm_pool_slots: int = 48
    shm_slot_bytes: int = 3 * 640 * 640

    # issue 16: gpu (docs/gpu.md). CUDA shared memory on the inference stage: regions a client
    # may register at once and the device bytes they may map together (the client owns them).
    cuda_shm_max_regions: int = 64
    cuda_shm_max_bytes: int = 8 * 1024**3
    # Where postprocess decodes YOLO candidates and runs NMS: "cpu" (numpy, the reference) or
    # "cuda" / "cuda:N" / "torch-cpu" (torchvision's batched_nms on that device; torch-cpu runs
    # the device path's code on the CPU, for testing it without a GPU).
    postprocess_device: str = "cpu"
    # ONNX Runtime's TensorRT EP before CUDA when the wheel has it: fp16 engines, cached per
    # model under this folder (empty: ~/.cache/inferline/tensorrt, beside the weights cache).
    ort_tensorrt: bool = False
    ort_tensorrt_fp16: bool = True
    ort_tensorrt_cache_dir: Path | None = None

    # issue 18: storage. `inferline fetch-models` (services/inference/storage.py, docs/deployment.md):
    # the model sources file (the chart's sources.yaml), where pvc:// claims are mounted, and how
    # long a store that does not answer is waited for (0 attempts: for ever, as an init container).
    model_sources: Path | None = None
    pvc_root: Path = Path("/mnt/pvc")
    fetch_attempts: int = 0
    fetch_backoff_s: float = 2.0
    fetch_max_backoff_s: float = 300.0
    fetch_timeout_s: float = 60.0

    # issue 19: cli. What `inferline detect` may download for a URL source (megabytes, seconds), and
    # how many requests of frames it keeps outstanding (bounds the frames held in memory).
    cli_url_max_mb: float = 64.0
    cli_url_timeout_s: float = 30.0
    cli_inflight: int = 2

    # issue 17: fast by default (docs/performance.md). The window of inferline_model_busy_ratio;
    # where exports made at load (a served .pt with backend onnxruntime) are cached, with the
    # sha256 and check of each (empty: ~/.cache/inferline/exports).
    model_busy_window_s: float = 10.0
    export_cache_dir: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = PREFIX + f.name.upper()
            if var in env and env[var] != "":
                values[f.name] = _parse(var, env[var], f.type)
        return cls(**values)

    def port(self, stage: str) -> int:
        return int(getattr(self, f"{stage if stage == GATEWAY else _known(stage)}_port"))

    def metrics_port(self, stage: str) -> int | None:
        """The stage's /metrics port, or None when metrics are off for it."""
        port = int(getattr(self, f"{_known(stage)}_metrics_port"))
        return port if self.metrics and port >= 0 else None

    def target(self, stage: str) -> str:
        return str(getattr(self, f"{_known(stage)}_target"))

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def gateway_max_upload_bytes(self) -> int:
        return self.gateway_max_upload_mb * 1024 * 1024


def _known(stage: str) -> str:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    return stage


def _parse(var: str, raw: str, type_name: Any) -> Any:
    kind = str(type_name)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError("expected true/false")
        if kind in ("Path | None", "Path"):
            return Path(raw).expanduser()
        if kind == "tuple[Path, ...]":
            return tuple(Path(part).expanduser() for part in raw.split(os.pathsep) if part)
        if kind == "tuple[str, ...]":
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError as exc:
        raise ConfigError(f"{var}={raw!r} is not a valid {kind}: {exc}") from None
