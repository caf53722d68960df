"""`python -m fastpeft`: the same as the `fastpeft` command."""
import sys

from .cli import main

sys.exit(main())
