"""The models a caller gets without naming one: the CLI's and the gateway's defaults, and the
benchmarks'. A detector and a zero-shot embedding model that the built-in repository serves."""

DETECT_MODEL = "yolov8n"
EMBED_MODEL = "clip-vit-b-32"
