"""An ICMP echo over a datagram socket, for containers.

Containers have no CAP_NET_RAW (as in Podman): ping works through the datagram ICMP socket
that ``net.ipv4.ping_group_range`` opens, which iputils' ping uses. Debian's busybox 1.35
ping in the minimal image only knows raw sockets, so container tests bring this probe.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from tests.integration.helpers import compile_static

PROBE_PATH = "/.vzt-icmp"

# `ping HOST`: resolve (the container's resolv.conf and hosts), one echo, exit 0 on a reply.
# `check IP`: a raw socket, then an echo as root and again as nobody:nogroup.
_SOURCE = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <grp.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/ip_icmp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *echo(struct in_addr to, int timeout_ms) {
    int s = socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP);
    if (s < 0) return errno == EACCES ? "EACCES" : strerror(errno);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_addr = to};
    struct icmphdr req = {.type = ICMP_ECHO};
    req.un.echo.sequence = htons(1);
    if (sendto(s, &req, sizeof req, 0, (struct sockaddr *)&dst, sizeof dst) < 0)
        return strerror(errno);
    struct pollfd p = {.fd = s, .events = POLLIN};
    if (poll(&p, 1, timeout_ms) != 1) return "timeout";
    struct icmphdr rep;
    if (recv(s, &rep, sizeof rep, 0) < (int)sizeof rep) return strerror(errno);
    close(s);
    return rep.type == ICMP_ECHOREPLY ? "reply" : "other";
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    if (strcmp(argv[1], "check") == 0) {
        struct in_addr to;
        inet_pton(AF_INET, argv[2], &to);
        int raw = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
        printf("raw=%s\n", raw >= 0 ? "ok" : errno == EPERM ? "EPERM" : strerror(errno));
        printf("root=%s\n", echo(to, 10000));
        if (setgroups(0, NULL) || setgid(65534) || setuid(65534)) return 2;
        printf("nobody=%s\n", echo(to, 10000));
        return 0;
    }
    struct addrinfo hints = {.ai_family = AF_INET}, *res;
    int err = getaddrinfo(argv[2], NULL, &hints, &res);
    if (err) {
        printf("ping: bad address '%s': %s\n", argv[2], gai_strerror(err));
        return 1;
    }
    struct in_addr to = ((struct sockaddr_in *)res->ai_addr)->sin_addr;
    printf("PING %s (%s)\n", argv[2], inet_ntoa(to));
    const char *r = echo(to, argc > 3 ? atoi(argv[3]) * 1000 : 2000);
    printf("%s\n", r);
    return strcmp(r, "reply") == 0 ? 0 : 1;
}
"""


@functools.cache
def probe() -> bytes:
    """The probe, statically linked (containers have no libc of their own)."""
    tmp = Path(tempfile.mkdtemp(prefix="vzt-icmp-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    # glibc warns that a static getaddrinfo wants NSS modules at run time: files and dns
    # are built into glibc since 2.34, and they are all the probe needs.
    return compile_static(tmp, "icmp", _SOURCE).read_bytes()
