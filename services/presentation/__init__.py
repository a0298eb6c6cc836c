"""What a person or a program reads: the public API's results as JSON, CSV and annotated PNG.

One module for every edge, so the CLI, the HTTP gateway and the postprocess stage's ``Render``
cannot drift apart:

* ``renderers``: one image's detections -> bytes, by format (``RENDERERS``: json, csv, png);
  the postprocess stage renders with them server-side, and the documents below reuse their
  JSON object and CSV rows.
* ``documents``: a whole Detect, Classify or Embed result (``common/api.py``'s values) -> the
  JSON document and CSV table the CLI prints and the gateway answers.

Importing it pulls in neither Pillow nor OpenCV (the PNG renderer imports Pillow when it runs):
the gateway's image has neither.
"""
