"""`python -m plexus`: the plexus command line."""
import sys

from plexus.entrypoints.cli import main

sys.exit(main())
