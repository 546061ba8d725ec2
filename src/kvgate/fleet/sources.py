"""Static endpoint sources: the ``--endpoints`` flag and a watched ``--endpoints-file``.

Address syntax
    ``ip:port`` with an IPv4 literal (``10.0.0.7:8000``) or a bracketed IPv6 literal
    (``[2001:db8::7]:8000``), optionally followed by ``=instance_id`` (an integer in
    ``[0, 2**63)``, the Dynamo worker id put in routing headers). Hostnames are refused: the
    address is what the EPP hands Envoy in ``x-gateway-destination-endpoint``, and Envoy's
    ``ORIGINAL_DST`` cluster takes that value as a literal IP, never resolving it. Addresses are
    canonicalised (``[2001:DB8:0::7]:8000`` becomes ``[2001:db8::7]:8000``) so one endpoint
    written two ways is caught as a duplicate; in central KV-event mode the engines' topics must
    name this canonical form.

Endpoints file
    A YAML or JSON (by the ``.json`` suffix) list. Each entry is a string in the flag's syntax or a
    mapping with ``address`` and optionally ``instance_id``, ``engine``, ``role``, ``labels``
    (string to string), ``events`` and ``replay`` (ZMQ endpoints of the engine's KV-event
    publisher and replay socket); YAML needs IPv6 addresses quoted (``"[fd00::1]:8000"``), or
    it reads the brackets as a list. Unknown keys are refused. ``events`` absent means "by
    convention" (see `events_endpoint_for`); ``events: null`` means the engine publishes none.
    An empty file is an error, not an empty fleet (write ``[]`` for that): a writer that truncates
    before writing must not empty the fleet for a moment.

Watching
    `EndpointsFileWatcher` polls the file (``stat`` every ``poll_interval_s``; the content is
    re-read and hashed when the stat changes, or on every poll while the mtime is recent enough
    that a coarse-grained filesystem could hide a second write). A changed content is applied once
    it has been seen identical on two consecutive polls, so a half-written file is not applied.
    While running, a broken or vanished file keeps the last good fleet; each distinct error is
    logged once. At start an invalid file is an error (fail loudly) but an absent one only warns:
    the EPP must be able to start with zero endpoints.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast, get_args

import yaml

from kvgate.errors import InvalidInput
from kvgate.fleet.endpoint import Endpoint, EndpointSet, EngineType, Role
from kvgate.service import Service

__all__ = [
    "EndpointDefaults",
    "EndpointSpecError",
    "EndpointsFileWatcher",
    "events_endpoint_for",
    "load_endpoints_file",
    "parse_endpoint_entries",
    "parse_endpoints_flag",
]

logger = logging.getLogger(__name__)

ENGINES: Final[tuple[str, ...]] = get_args(EngineType)
ROLES: Final[tuple[str, ...]] = get_args(Role)
ENTRY_KEYS: Final = ("address", "engine", "events", "instance_id", "labels", "replay", "role")
_MAX_INSTANCE_ID: Final = 2**63  # etcd lease ids, which Dynamo uses as worker ids, are int64
_ZMQ_SCHEMES: Final = ("tcp://", "ipc://")
# Filesystems with 1-2 s mtime granularity can give two writes the same mtime; a file modified
# this recently is re-read on every poll instead of trusting its stat.
_RACY_WINDOW_NS: Final = 2_000_000_000
_UNQUOTED_IPV6: Final = re.compile(r"(?:^|[\s:-])\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\]:", re.MULTILINE)


class EndpointSpecError(InvalidInput):
    """An endpoint list (flag or file) that cannot be used; the message names the bad item."""


@dataclass(frozen=True, slots=True)
class EndpointDefaults:
    """What entries that do not say otherwise get."""

    engine: EngineType = "vllm"
    events_port: int | None = None
    """Port of every engine's KV-event publisher, for entries that name no ``events``
    (``tcp://<endpoint ip>:<events_port>``). None: such entries get no events endpoint."""
    replay_port: int | None = None
    """Port of every engine's KV-event replay socket (vLLM's ``replay_endpoint``), for entries
    with a conventional events endpoint: gaps are refilled from it, and a restarted picker reads
    the engine's history there. None: no replay endpoint."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise EndpointSpecError(f"engine must be one of {', '.join(ENGINES)}: {self.engine!r}")
        for name, port in (("events", self.events_port), ("replay", self.replay_port)):
            if port is not None and not 0 < port < 65536:
                raise EndpointSpecError(f"{name} port must be in 1..65535, got {port}")

    def replay_for(self, address: str) -> str | None:
        """The conventional replay endpoint of the engine at ``address``, if there is one."""
        if self.events_port is None or self.replay_port is None:
            return None
        return events_endpoint_for(address, self.replay_port)


def events_endpoint_for(address: str, events_port: int) -> str:
    """The conventional KV-event endpoint of the engine at `address`: same IP, `events_port`."""
    host = address.rsplit(":", 1)[0]  # keeps an IPv6 literal's brackets, as ZMQ wants them
    return f"tcp://{host}:{events_port}"


def _parse_port(text: str) -> int:
    # isascii+isdigit: int() would also take "+80", " 80", "8_0" and non-ASCII digits.
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range 1..65535")
    return port


def _parse_address(text: str) -> str:
    """Canonical ``ip:port`` of an address literal, or ValueError saying what is wrong."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [ipv6]:port")
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        return f"[{ip.compressed}]:{_parse_port(port)}"
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected ip:port")
    try:
        ip4 = ipaddress.IPv4Address(host)
    except ValueError:
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets: [ipv6]:port") from None
        if host.replace(".", "").isdigit():
            raise ValueError(
                f"{host!r} is not an IPv4 address (four parts 0-255, no leading zeros)"
            ) from None
        raise ValueError(
            f"{host!r} is not an IP address (hostnames are not accepted: Envoy routes to the "
            "address as a literal IP; resolve it first)"
        ) from None
    return f"{ip4}:{_parse_port(port)}"


def _parse_instance_id(value: object) -> int:
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise ValueError(f"instance id {value!r} is not a non-negative integer")
        value = int(value)
    # bool is an int subclass; `instance_id: true` is a mistake, not 1.
    if type(value) is not int or not 0 <= value < _MAX_INSTANCE_ID:
        raise ValueError(f"instance id {value!r} is not an integer in [0, 2**63)")
    return value


def _parse_item(text: str, defaults: EndpointDefaults) -> Endpoint:
    address, sep, instance = text.strip().partition("=")
    address = _parse_address(address.strip())
    return Endpoint(
        address,
        instance_id=_parse_instance_id(instance.strip()) if sep else None,
        engine=defaults.engine,
        events_endpoint=_default_events(address, defaults),
        replay_endpoint=defaults.replay_for(address),
    )


def _default_events(address: str, defaults: EndpointDefaults) -> str | None:
    if defaults.events_port is None:
        return None
    return events_endpoint_for(address, defaults.events_port)


def _check_unique(endpoints: list[Endpoint], names: list[str]) -> None:
    first: dict[str, str] = {}
    for endpoint, name in zip(endpoints, names, strict=True):
        earlier = first.get(endpoint.address)
        if earlier is not None:
            raise EndpointSpecError(f"{name} repeats the address {endpoint.address} of {earlier}")
        first[endpoint.address] = name


def parse_endpoints_flag(
    text: str, defaults: EndpointDefaults = EndpointDefaults()
) -> list[Endpoint]:
    """Endpoints of ``--endpoints "ip:port[=instance_id],..."``; blank text means none."""
    if not text.strip():
        return []
    endpoints: list[Endpoint] = []
    names: list[str] = []
    for number, item in enumerate(text.split(","), start=1):
        name = f"--endpoints item {number} ({item.strip()!r})"
        if not item.strip():
            raise EndpointSpecError(f"--endpoints item {number} is empty (a stray comma?)")
        try:
            endpoints.append(_parse_item(item, defaults))
        except ValueError as exc:
            raise EndpointSpecError(f"{name}: {exc}") from None
        names.append(name)
    _check_unique(endpoints, names)
    return endpoints


def _zmq_endpoint(value: object, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(_ZMQ_SCHEMES):
        raise ValueError(f"{key} must be a ZMQ endpoint like tcp://10.0.0.7:5557, got {value!r}")
    if value.startswith("tcp://"):
        host, sep, port = value.removeprefix("tcp://").rpartition(":")
        if not sep or not host:
            raise ValueError(f"{key} {value!r} has no port")
        _parse_port(port)
    return value


def _choice(value: object, allowed: tuple[str, ...], key: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _parse_mapping(entry: Mapping[object, object], defaults: EndpointDefaults) -> Endpoint:
    unknown = [key for key in entry if key not in ENTRY_KEYS]
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(str(key), ENTRY_KEYS, n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"unknown key {key!r}{did_you_mean} (allowed: {', '.join(ENTRY_KEYS)})")
    raw_address = entry.get("address")
    if not isinstance(raw_address, str):
        raise ValueError(f"address must be a string like 10.0.0.7:8000, got {raw_address!r}")
    address = _parse_address(raw_address.strip())
    engine = cast(EngineType, _choice(entry.get("engine", defaults.engine), ENGINES, "engine"))
    role = cast(Role, _choice(entry.get("role", "both"), ROLES, "role"))
    labels = entry.get("labels", {})
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ValueError(f"labels must map strings to strings (quote numbers), got {labels!r}")
    instance = entry.get("instance_id")
    events = (
        _zmq_endpoint(entry["events"], "events")
        if "events" in entry
        else _default_events(address, defaults)
    )
    # An entry that names its events endpoint names its replay socket too (or has none).
    replay = (
        _zmq_endpoint(entry.get("replay"), "replay")
        if "replay" in entry or "events" in entry
        else defaults.replay_for(address)
    )
    return Endpoint(
        address,
        instance_id=None if instance is None else _parse_instance_id(instance),
        engine=engine,
        role=role,
        labels=dict(labels),
        events_endpoint=events,
        replay_endpoint=replay,
    )


def parse_endpoint_entries(
    entries: object, defaults: EndpointDefaults = EndpointDefaults(), *, source: str = "endpoints"
) -> list[Endpoint]:
    """Endpoints of a decoded endpoints document (a list of strings or mappings).

    `source` names the document in error messages (the file's path).
    """
    if not isinstance(entries, list):
        raise EndpointSpecError(
            f"{source}: expected a list of endpoints, got {type(entries).__name__}"
        )
    endpoints: list[Endpoint] = []
    names: list[str] = []
    for index, entry in enumerate(entries):
        name = f"{source} entry {index}"
        try:
            if isinstance(entry, str):
                endpoints.append(_parse_item(entry, defaults))
            elif isinstance(entry, Mapping):
                endpoints.append(_parse_mapping(entry, defaults))
            else:
                raise ValueError(
                    f"expected a string or a mapping, got {type(entry).__name__} {entry!r}"
                )
        except ValueError as exc:
            raise EndpointSpecError(f"{name}: {exc}") from None
        names.append(name)
    _check_unique(endpoints, names)
    return endpoints


def _decode_document(data: bytes, path: Path) -> object:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EndpointSpecError(f"{path}: not UTF-8 ({exc})") from None
    try:
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        hint = ""
        if isinstance(exc, yaml.YAMLError) and _UNQUOTED_IPV6.search(text):
            hint = ' (YAML reads [...] as a list: quote IPv6 addresses, "[fd00::1]:8000")'
        raise EndpointSpecError(f"{path}: {exc}{hint}") from None
    if document is None:
        raise EndpointSpecError(f"{path}: the file is empty; write [] for no endpoints")
    return document


def _parse_file_bytes(data: bytes, path: Path, defaults: EndpointDefaults) -> list[Endpoint]:
    return parse_endpoint_entries(_decode_document(data, path), defaults, source=str(path))


def load_endpoints_file(
    path: str | os.PathLike[str], defaults: EndpointDefaults = EndpointDefaults()
) -> list[Endpoint]:
    """Endpoints listed in the file; raises `EndpointSpecError` or the OSError of reading it."""
    path = Path(path)
    return _parse_file_bytes(path.read_bytes(), path, defaults)


_StatKey = tuple[int, int, int, int]


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class EndpointsFileWatcher(Service):
    """Keep an `EndpointSet` equal to the endpoints listed in a file (see the module docstring).

    Use as ``async with EndpointsFileWatcher(path, endpoint_set):`` or `start` / `aclose`;
    `check` runs one poll synchronously.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        endpoints: EndpointSet,
        defaults: EndpointDefaults = EndpointDefaults(),
        *,
        poll_interval_s: float = 0.5,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self.path = Path(path)
        self._endpoints = endpoints
        self._defaults = defaults
        self._interval = poll_interval_s
        self._stat: _StatKey | None = None
        self._applied: bytes | None = None
        """Digest of the content now applied (None: nothing from the file yet)."""
        self._pending: bytes | None = None
        """Digest of a new content seen once, applied if the next poll sees it again."""
        self._error: str | None = None
        """The error last logged; the same one is not logged again."""
        self._task: asyncio.Task[None] | None = None
        self.applied = 0
        """Times a new content was applied to the endpoint set (the initial load included)."""

    async def start(self) -> None:
        """Load the file into the endpoint set, then watch it.

        Raises `EndpointSpecError` (or the OSError of reading) when the file exists but cannot be
        used; an absent file gives zero endpoints and a warning.
        """
        if self._task is not None:
            return
        try:
            # Stat before reading: a write in between then shows as a change at the next poll.
            stat = self._stat_key()
            data = self.path.read_bytes()
        except FileNotFoundError:
            logger.warning(
                "endpoints file %s does not exist: starting with no endpoints; they are added "
                "when it appears",
                self.path,
            )
            self._error = "missing"
            self._endpoints.replace([])
        else:
            endpoints = _parse_file_bytes(data, self.path, self._defaults)
            self._apply(endpoints, _digest(data), stat)
        self._task = asyncio.get_running_loop().create_task(
            self._watch(), name=f"endpoints-file {self.path}"
        )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.check()
            except Exception:
                # A listener of the endpoint set failed; the watcher must outlive it.
                logger.exception("applying endpoints file %s failed", self.path)

    def _stat_key(self) -> _StatKey:
        st = os.stat(self.path)  # follows symlinks: a Kubernetes ConfigMap swap changes st_ino
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def check(self) -> bool:
        """One poll: True if a new endpoint list was applied."""
        try:
            stat = self._stat_key()
            racy = time.time_ns() - stat[0] < _RACY_WINDOW_NS
            if stat == self._stat and not racy and self._pending is None:
                return False
            data = self.path.read_bytes()
        except FileNotFoundError:
            self._stat = None
            self._report(
                "missing",
                f"endpoints file {self.path} has disappeared; keeping the last "
                f"{len(self._endpoints)} endpoints (write [] to remove them all)",
            )
            return False
        except OSError as exc:
            self._stat = None
            self._report(
                str(exc),
                f"cannot read endpoints file {self.path}: {exc}; keeping the "
                f"last {len(self._endpoints)} endpoints",
            )
            return False
        self._stat = stat
        digest = _digest(data)
        if digest == self._applied:
            self._pending = None
            self._recovered()
            return False
        if digest != self._pending:
            self._pending = digest
            return False
        self._pending = None
        try:
            endpoints = _parse_file_bytes(data, self.path, self._defaults)
        except EndpointSpecError as exc:
            self._report(
                str(exc), f"{exc}; keeping the last {len(self._endpoints)} endpoints until fixed"
            )
            return False
        self._apply(endpoints, digest, stat)
        return True

    def _apply(self, endpoints: list[Endpoint], digest: bytes, stat: _StatKey) -> None:
        self._stat = stat
        self._applied = digest
        self._recovered()
        self._endpoints.replace(endpoints)
        self.applied += 1
        logger.info("endpoints file %s: %d endpoints", self.path, len(endpoints))

    def _report(self, key: str, message: str) -> None:
        if key != self._error:
            self._error = key
            logger.error("%s", message)

    def _recovered(self) -> None:
        if self._error is not None:
            self._error = None
            logger.info("endpoints file %s is usable again", self.path)
