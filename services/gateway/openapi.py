"""Writes the gateway's OpenAPI document: ``python -m inferline.services.gateway.openapi [PATH]``.

``make openapi`` writes docs/openapi.json with it; a test fails when the committed file is stale.
The document is built from default settings, so it does not depend on the machine it runs on.
"""

from __future__ import annotations

import sys
from pathlib import Path

from inferline.services.gateway.app import openapi_document


def main(argv: list[str]) -> int:
    text = openapi_document()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
