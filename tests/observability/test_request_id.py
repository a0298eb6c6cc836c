"""Every call has a request id: the caller's own (``x-request-id``) or a new one, and the caller
gets it back in the trailing metadata, so a support ticket can quote the id the logs hold."""

from __future__ import annotations

import grpc

from inferline.common.generated import controller_pb2_grpc, inference_pb2


def test_a_call_without_a_request_id_gets_one_back_and_an_overlong_one_is_cut(stack):
    with grpc.insecure_channel(stack.controller) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        _, call = stub.ListModels.with_call(inference_pb2.ListModelsRequest(), timeout=30)
        given = dict(call.trailing_metadata())["x-request-id"]
        assert len(given) == 32 and int(given, 16) >= 0
        _, call = stub.ListModels.with_call(inference_pb2.ListModelsRequest(), metadata=[("x-request-id", "r" * 500)],
                                            timeout=30)
        assert dict(call.trailing_metadata())["x-request-id"] == "r" * 128
