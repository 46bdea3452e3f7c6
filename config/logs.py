# How every `aforo` process logs: INFO and up to stderr, with time and process id.
import logging


def configure_logging():
    """Log INFO and up to stderr with times (once per process: spawned workers call it
    too, as they inherit nothing from the parent's configuration)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
