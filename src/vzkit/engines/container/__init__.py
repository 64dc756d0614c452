"""The container engine (``engine.ContainerEngine``): the daemon's side of containers.

It drives the OCI runtime ``vz-runtime`` (the ``vzkit_runtime`` package) through its
command line only, never by importing it.
"""
