"""The OCI container runtime: namespaces, mounts, capabilities, seccomp.

Kept import-free on purpose: ``vz-runtime`` starts a process per container operation and
must import in a few milliseconds, so each submodule is imported only where it is used.
"""
