"""The exceptions kvgate raises on purpose, and what a command does with them.

::

    KvgateError                  anything kvgate reports to its user rather than crashing on
     ├── ConfigError             a setting is missing or invalid (a flag, an environment variable,
     │    │                      a config file, a plugin parameter): the process refuses to start
     │    │                      and exits 2; ``field`` names the setting, ``reason`` what to change
     │    └── (EppConfigError, PluginConfigError, EndpointSpecError, KubeConfigError, ...)
     └── StartupError            a part could not be started (Envoy, nats-server, a port): exit 1

Servers catch `KvgateError` at the top of a command and print it as one line; anything else is a
bug and keeps its traceback. Errors about one request (a malformed body, an unknown model) are not
here: they become HTTP statuses (`kvgate.scheduling.request.SchedulingError`).
"""

from __future__ import annotations


class KvgateError(Exception):
    """An error kvgate reports to its user as a message, not a traceback."""

    exit_code = 1


class ConfigError(KvgateError, ValueError):
    """A setting is missing or invalid; the message says which and what to change."""

    exit_code = 2

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class StartupError(KvgateError, RuntimeError):
    """A process or listener kvgate needs could not be started."""
