"""`python -m kondense.operator`: the operator process (what the chart's Deployment runs)."""

from __future__ import annotations

import asyncio
import logging

import kopf

from kondense import handlers  # noqa: F401 - registers the handlers
from kondense.settings import Settings


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers.configure(settings)
    asyncio.run(
        kopf.operator(
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            standalone=settings.peering is None,
            peering_name=settings.peering,
            liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz",
        )
    )


if __name__ == "__main__":
    main()
