"""Logging set-up shared by every process."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, service: str) -> None:
    """One line per record on stderr, tagged with the service so `inferline up` output reads."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s [{service}] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
