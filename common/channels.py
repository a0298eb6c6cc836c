"""Client channels between services, configured once."""

from __future__ import annotations

import grpc

from inferline.common.settings import Settings
from inferline.common.telemetry.interceptors import TelemetryClientInterceptor
from inferline.common.tls import channel_credentials


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]


def create_channel(target: str, settings: Settings) -> grpc.aio.Channel:
    credentials = channel_credentials(settings)
    interceptors = [TelemetryClientInterceptor()]  # trace context
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=channel_options(settings), interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=channel_options(settings), interceptors=interceptors)
