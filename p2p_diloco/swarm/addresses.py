"""Which addresses a peer listens on and which it announces to other machines.

By default a peer listens on every interface (IPv4, and IPv6 where the machine
has it) on one TCP port, and announces the addresses another machine can use:
public ones first, then private ones (LAN, CGNAT, IPv6 ULA); link-local never
(they need a zone); loopback only when the machine has nothing else (then every
peer is local). `--announce-maddrs` puts the user's own (a forwarded port, a
public address behind NAT) in front. Given `--host-maddrs`, the daemon listens
there and announces what it sees, as hivemind does.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import os
import socket
import struct

from hivemind.utils.multiaddr import Multiaddr

_SIOCGIFCONF = 0x8912
_IFREQ_SIZE = 40 if struct.calcsize("P") == 8 else 32
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class AddressError(ValueError):
    pass


def rank(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """0: public, 1: private (reachable on a LAN or VPN), 2: link-local, 3: loopback or unspecified."""
    if ip.is_loopback or ip.is_unspecified:
        return 3
    if ip.is_link_local:
        return 2
    if ip.is_private or ip in _CGNAT or (ip.version == 6 and ip in ipaddress.ip_network("fc00::/7")):
        return 1
    return 0


def _ipv4_addresses() -> list[ipaddress.IPv4Address]:
    """Every IPv4 address of this machine's interfaces (Linux SIOCGIFCONF); [] where that is not available."""
    buf = array.array("B", bytes(_IFREQ_SIZE * 128))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            out = fcntl.ioctl(s.fileno(), _SIOCGIFCONF, struct.pack("iL", len(buf), buf.buffer_info()[0]))
    except OSError:
        return []
    length = struct.unpack("iL", out)[0]
    data = buf.tobytes()[:length]
    return [ipaddress.IPv4Address(data[i + 20:i + 24]) for i in range(0, length, _IFREQ_SIZE)]


def _ipv6_addresses() -> list[ipaddress.IPv6Address]:
    """Every IPv6 address of this machine's interfaces (Linux /proc/net/if_inet6); [] without IPv6."""
    try:
        with open("/proc/net/if_inet6") as f:
            return [ipaddress.IPv6Address(bytes.fromhex(line.split()[0])) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def has_ipv6() -> bool:
    return socket.has_ipv6 and os.path.exists("/proc/net/if_inet6")


def local_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """This machine's addresses, the likeliest to be reachable from elsewhere first."""
    found = dict.fromkeys([*_ipv4_addresses(), *_ipv6_addresses()])
    return sorted(found, key=lambda ip: (rank(ip), ip.version))


def free_port(ipv6: bool) -> int:
    """A TCP port free on every IPv4 (and IPv6) address right now, for a daemon to listen on."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s4.bind(("0.0.0.0", 0))
            port = s4.getsockname()[1]
            if not ipv6:
                return port
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s6.bind(("::", port))
                    return port
            except OSError:
                continue
    raise AddressError("found no TCP port free on both IPv4 and IPv6")


def _check_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            raise AddressError(f"TCP port {port} is not free on this machine ({e.strerror}): is another peer or "
                               "host running here? pick another with --port") from None


def check_maddrs(values: list[str], option: str) -> list[str]:
    """Parse multiaddrs given by the user; an error names the option and the bad value."""
    for value in values:
        try:
            Multiaddr(value)
        except Exception as e:
            raise AddressError(f"{option} {value!r} is not a multiaddr ({e}); "
                               "expected e.g. /ip4/203.0.113.5/tcp/31337") from None
    return values


def listen_and_announce(port: int, announce: list[str], ipv6: bool | None = None
                        ) -> tuple[list[str], list[str]]:
    """(listen multiaddrs, announced multiaddrs) for a peer listening on all interfaces on `port`
    (0: a free one is picked now, since what is announced needs the real port)."""
    if not 0 <= port <= 65535:
        raise AddressError(f"--port {port}: a TCP port is 0-65535 (0: any free one)")
    ipv6 = has_ipv6() if ipv6 is None else ipv6
    if port:
        _check_free(port)
    port = port or free_port(ipv6)
    listen = [f"/ip4/0.0.0.0/tcp/{port}"] + ([f"/ip6/::/tcp/{port}"] if ipv6 else [])
    ips = [ip for ip in local_addresses() if ip.version == 4 or ipv6]
    routable = [ip for ip in ips if rank(ip) <= 1]
    chosen = routable or [ip for ip in ips if rank(ip) == 3] or [ipaddress.IPv4Address("127.0.0.1")]
    own = [f"/ip{ip.version}/{ip}/tcp/{port}" for ip in chosen]
    return listen, list(dict.fromkeys([*announce, *own]))


def rank_of(maddr: str) -> int:
    """`rank` of a multiaddr's IP; 4 when it has none (dns, a relay circuit) or does not parse."""
    try:
        m = Multiaddr(maddr)
        for proto in ("ip4", "ip6"):
            if proto in m:
                return rank(ipaddress.ip_address(m[proto]))
    except Exception:
        pass
    return 4


def port_of(maddr: str) -> int | None:
    try:
        return int(Multiaddr(maddr)["tcp"])
    except Exception:
        return None


def likeliest_first(maddrs: list[str]) -> list[str]:
    """Visible multiaddrs ordered for a user on another machine: public, private, link-local, loopback."""
    return sorted(maddrs, key=rank_of)
