"""One log format for every process."""

import logging


def configure_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
    # grpc's own loggers are chatty at INFO about every reconnect.
    logging.getLogger("grpc").setLevel(max(logging.WARNING, logging.getLogger().level))
