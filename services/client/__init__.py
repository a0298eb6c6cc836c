"""The client of the public API (``inferline.v1.ControllerService``): one package for the CLI,
the HTTP gateway, the benchmarks and anyone's scripts.

``Client`` (blocking) and ``AsyncClient`` (grpc.aio) take and return the domain values of
``common/api.py``: ``DetectRequest -> DetectResult``, ``ClassifyRequest -> ClassifyResult``,
``EmbedRequest -> EmbedResult``; ``models()`` and ``model(name)`` return the model metadata
messages as the controller sends them. Their channel comes from the services' own factory
(``common/channels.py``): the same message limit, retry policy and TLS (``INFERLINE_TLS_*`` in
the ``Settings`` passed in).

Errors. An item that failed alone (one bad image of a batch) is not an exception: its result
carries the domain error (``ImageDetections.error``). A call that failed as a whole raises the
domain error its status stands for, by the one status table (``common/status.py``), read
backwards: NOT_FOUND raises ``ModelNotFound``, RESOURCE_EXHAUSTED ``Overloaded``, UNAVAILABLE
``StageUnavailable``, DEADLINE_EXCEEDED ``DeadlineExceeded``, INVALID_ARGUMENT ``InvalidInput``,
anything else ``StageFailed``. The sync and async clients raise the same errors; each is chained
(``__cause__``) to the ``grpc.RpcError`` it came from, and a server's retry hint (gRPC
``RetryInfo``) is its ``retry_after_s``. ``status_for(error)`` gives the status back, so an item's
error and a call's error are reported the same way.
"""

from inferline.services.client.aio import AsyncClient
from inferline.services.client.calls import error_from_rpc
from inferline.services.client.images import IMAGE_SUFFIXES, collect_images, image_inputs
from inferline.services.client.sync import Client

__all__ = ["AsyncClient", "Client", "IMAGE_SUFFIXES", "collect_images", "error_from_rpc", "image_inputs"]
