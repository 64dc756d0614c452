"""vz-runtime: vzkit's OCI container runtime (runc's command line).

A package of its own that imports only the Python standard library: a container engine
runs it several times per container, so its start-up is its main cost, and it runs
where vzkit is not installed (a guest with only python3). ``vzkit`` talks to it through
its command line only. Each submodule is imported only where it is used.
"""
