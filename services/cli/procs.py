"""Which process listens on a local TCP port, from /proc (Linux), for ``inferline bench``'s CPU
and memory figures: a stack is found by the ports it serves on, so a second stack on the same
machine (another checkout, another user's) is never measured by mistake, as it could be by
command line."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

LISTEN = "0A"  # TCP state in /proc/net/tcp
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0", ""})


def listening_inodes(proc: Path = Path("/proc")) -> dict[int, set[str]]:
    """Port -> the socket inodes listening on it (IPv4 and IPv6)."""
    found: dict[int, set[str]] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN:
                port = int(fields[1].rsplit(":", 1)[1], 16)
                found.setdefault(port, set()).add(fields[9])
    return found


def listening_pids(ports: Iterable[int], proc: Path = Path("/proc")) -> dict[int, int]:
    """Port -> the process holding its listening socket, for those of ``ports`` that one of
    this user's processes holds (another user's /proc/<pid>/fd is unreadable, and skipped)."""
    inodes = listening_inodes(proc)
    wanted = {f"socket:[{inode}]": port for port in ports for inode in inodes.get(port, ())}
    found: dict[int, int] = {}
    if not wanted:
        return found
    for entry in proc.glob("[0-9]*"):
        for link in _fd_links(entry):
            if (port := wanted.get(link)) is not None:
                found.setdefault(port, int(entry.name))
    return found


def _fd_links(process: Path) -> Iterator[str]:
    """What a process's descriptors point at; a process or descriptor gone meanwhile (or not
    ours to read) is skipped."""
    try:
        descriptors = list((process / "fd").iterdir())
    except OSError:
        return
    for descriptor in descriptors:
        try:
            yield str(descriptor.readlink())
        except OSError:
            continue


def local_port(target: str) -> int | None:
    """The port of a ``host:port`` target on this machine; None for another host."""
    host, _, port = target.removeprefix("dns:///").removeprefix("ipv4:").rpartition(":")
    return int(port) if port.isdigit() and host in LOCAL_HOSTS else None


def stage_pids(targets: Mapping[str, str], proc: Path = Path("/proc")) -> dict[str, int]:
    """Stage -> the process serving the stage's target, for those served on this machine."""
    ports = {stage: port for stage, target in targets.items() if (port := local_port(target)) is not None}
    by_port = listening_pids(ports.values(), proc)
    return {stage: by_port[port] for stage, port in ports.items() if port in by_port}
