"""`python -m plexus.platforms.cpu.kernels`: build the CPU kernels now (make setup runs this) and say what
was built."""
import logging
import sys

from plexus.envs import Environment
from plexus.platforms.cpu import kernels

logging.basicConfig(level=logging.INFO, format="%(message)s")
env = Environment.read()
if not env.cpu_kernels or not kernels.load(env.cache_dir):
    print("plexus CPU kernels: not built; the pure-torch path will be used", file=sys.stderr)
    sys.exit(0)   # not an installation failure: everything still runs
print("plexus CPU kernels: built; bf16 GEMV " + ("on (avx512_bf16)" if kernels.fast_linear_available()
                                                  else "off (this CPU has no avx512_bf16)"))
