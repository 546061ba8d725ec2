"""Load vLLM's real KV event publisher (``vllm/distributed/kv_events.py``) without vLLM installed.

``import vllm`` needs torch and most of vLLM, so the one module is read straight out of the wheel
and executed with small stand-ins for the four vLLM modules it imports. The wheel is looked up in
``$KVGATE_VLLM_WHEEL`` (a .whl file or a directory holding one), else in ``/tmp/vllm``. Fetch it:

    pip download --no-deps vllm==0.33.0 -d /tmp/vllm
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

VLLM_VERSION = "0.33.0"
_MODULE_PATH = "vllm/distributed/kv_events.py"
_LOADED_NAME = "_kvgate_tests_vllm_kv_events"


def find_wheel() -> Path | None:
    location = Path(os.environ.get("KVGATE_VLLM_WHEEL", "/tmp/vllm"))
    if location.is_file():
        return location
    if location.is_dir():
        wheels = sorted(location.glob(f"vllm-{VLLM_VERSION}-*.whl"))
        return wheels[-1] if wheels else None
    return None


def load_kv_events() -> types.ModuleType:
    """vLLM's kv_events module, or skip the test with the reason it is not available."""
    loaded = sys.modules.get(_LOADED_NAME)
    if loaded is not None:
        return loaded
    wheel = find_wheel()
    if wheel is None and "KVGATE_VLLM_WHEEL" in os.environ:
        # `make test` downloads the wheel and says where: its absence there is a broken setup.
        pytest.fail(f"KVGATE_VLLM_WHEEL={os.environ['KVGATE_VLLM_WHEEL']} holds no vLLM wheel")
    if wheel is None:
        pytest.skip(
            f"vLLM {VLLM_VERSION} wheel not found: run `pip download --no-deps "
            f"vllm=={VLLM_VERSION} -d /tmp/vllm` or set KVGATE_VLLM_WHEEL"
        )
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(_MODULE_PATH).decode()
    module = types.ModuleType(_LOADED_NAME)
    module.__file__ = f"{wheel}!/{_MODULE_PATH}"
    # msgspec resolves the module's structs through sys.modules, so it stays registered.
    sys.modules[_LOADED_NAME] = module
    saved = {name: sys.modules.get(name) for name in _STUBS}
    try:
        sys.modules.update(_stub_modules())
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    except BaseException:
        del sys.modules[_LOADED_NAME]
        raise
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


_STUBS = (
    "vllm",
    "vllm.config",
    "vllm.config.kv_events",
    "vllm.logger",
    "vllm.utils",
    "vllm.utils.network_utils",
    "vllm.v1",
    "vllm.v1.core",
    "vllm.v1.core.kv_cache_utils",
)


@dataclass
class _KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""


def _is_ipv6(address: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address)
    except ValueError:
        return False


def _split_zmq_path(path: str) -> tuple[str, str, str]:
    scheme, _, rest = path.partition("://")
    host, _, port = rest.rpartition(":")
    return scheme, host.strip("[]"), port


def _stub_modules() -> dict[str, types.ModuleType]:
    modules = {name: types.ModuleType(name) for name in _STUBS}
    modules["vllm.config.kv_events"].__dict__["KVEventsConfig"] = _KVEventsConfig
    modules["vllm.logger"].__dict__["init_logger"] = logging.getLogger
    modules["vllm.utils.network_utils"].__dict__.update(
        get_ip=lambda: "127.0.0.1",
        get_tcp_uri=lambda ip, port: f"tcp://{ip}:{port}",
        is_valid_ipv6_address=_is_ipv6,
        split_zmq_path=_split_zmq_path,
    )
    modules["vllm.v1.core.kv_cache_utils"].__dict__["ExternalBlockHash"] = bytes | int
    return modules
