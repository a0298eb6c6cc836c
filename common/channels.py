"""Client channels between services, configured once."""

from __future__ import annotations

import grpc

from inferline.common.settings import Settings
from inferline.common.telemetry.interceptors import TelemetryClientInterceptor


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]


def create_channel(target: str, settings: Settings) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target, options=channel_options(settings), interceptors=[TelemetryClientInterceptor()]  # trace context
    )
