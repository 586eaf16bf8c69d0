"""vLLM's FlexibleArgumentParser, which its examples use with EngineArgs.add_cli_args."""
import argparse
import sys


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that also accepts --flag_name for --flag-name."""

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        fixed = []
        for arg in args:
            if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
                key, sep, value = arg.partition("=")
                arg = key.replace("_", "-") + sep + value
            fixed.append(arg)
        return super().parse_args(fixed, namespace)
