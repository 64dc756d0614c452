"""Host facts and bookkeeping: capability probe, cgroups, CPU/memory accounting.

Import from the submodules (``vzkit.host.cgroups``, ``vzkit.host.kvm``, ``vzkit.host.probe``,
``vzkit.host.resources``). This package imports nothing itself, so that light users do not
pay for pydantic through the probe.
"""
