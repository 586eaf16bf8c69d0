"""The ``plexus`` logger: INFO to stderr by default, as vLLM's, so a user sees
one-time work (GGUF conversion, KV cache sizing) as it happens. The level comes
from PLEXUS_LOGGING_LEVEL (or vLLM's VLLM_LOGGING_LEVEL), read once here; the
standard logging API changes it later, e.g.
``logging.getLogger("plexus").setLevel("WARNING")``."""
import logging

from plexus.envs import logging_level

logger = logging.getLogger("plexus")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging_level())
    logger.propagate = False
