"""vLLM's ``vllm.utils.FlexibleArgumentParser``, which its examples use with EngineArgs.add_cli_args,
and plexus's cache directory."""
import argparse
import os
import pathlib


def cache_dir() -> pathlib.Path:
    """Where plexus keeps what it builds once (converted GGUFs, compiled kernels): $PLEXUS_CACHE_DIR,
    else ~/.cache/plexus."""
    env = os.environ.get("PLEXUS_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "plexus"


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that also accepts --flag_name for --flag-name."""

    def parse_args(self, args=None, namespace=None):
        import sys

        args = sys.argv[1:] if args is None else list(args)
        fixed = []
        for arg in args:
            if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
                key, sep, value = arg.partition("=")
                arg = key.replace("_", "-") + sep + value
            fixed.append(arg)
        return super().parse_args(fixed, namespace)
