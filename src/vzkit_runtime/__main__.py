"""``python -m vzkit_runtime``: the same command line as ``vz-runtime``."""

import gc

gc.disable()  # a short-lived process: collections during imports only cost time

from vzkit_runtime.cli import launch  # noqa: E402

launch()
