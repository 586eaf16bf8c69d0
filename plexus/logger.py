"""The ``plexus`` logger: INFO to stderr by default, as vLLM's, so a user sees
one-time work (GGUF conversion, KV cache sizing) as it happens. Set the level
with the standard logging API, e.g. ``logging.getLogger("plexus").setLevel("WARNING")``."""
import logging

logger = logging.getLogger("plexus")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
