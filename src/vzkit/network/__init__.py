"""Virtual networks: bridges, veth and TAP links, nftables rules, dnsmasq (DHCP and DNS).

Every function that touches the kernel takes ``netns`` (None: the caller's namespace; a
name in /var/run/netns, a pid, or an nsfs path), so the daemon's tests can run the whole
network stack inside a throw-away namespace that stands in for the host.
"""

from vzkit.api.networks import FirewallRule, NetworkConfig, NicConfig, PortForward, Proto
from vzkit.network._netns import NetnsRef
from vzkit.network.dnsmasq import Dnsmasq, HostEntry
from vzkit.network.nft import InstanceFirewall, Ruleset

__all__ = [
    "Dnsmasq",
    "FirewallRule",
    "HostEntry",
    "InstanceFirewall",
    "NetnsRef",
    "NetworkConfig",
    "NicConfig",
    "PortForward",
    "Proto",
    "Ruleset",
]
