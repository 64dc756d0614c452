"""``python -m vzkit_runtime``: the same command line as ``vz-runtime``."""

import sys

from vzkit_runtime.cli import main

sys.exit(main())
