"""The HTTP/JSON gateway: a REST front door to the controller, with OpenAPI and a demo page.

It holds no model code and imports no torch: every request becomes one gRPC call to the
controller over one shared channel, and gRPC statuses become HTTP codes through the one table
in ``inferline.common.status``.
"""
