"""The exceptions kvgate raises on purpose, and what a command does with them.

::

    KvgateError                  anything kvgate reports to its user rather than crashing on
     ├── InvalidInput            input that cannot be used: running again unchanged fails again;
     │    │                      exit 2 (an endpoint list, a kubeconfig, a trace, a flag)
     │    └── ConfigError        a setting is missing or invalid (a flag, an environment variable,
     │         │                 a config file, a plugin parameter): ``field`` names the setting,
     │         │                 ``reason`` what to change
     │         └── EppConfigError → PluginConfigError   (kvgate.scheduling.registry)
     └── StartupError            a part could not be started (Envoy, nats-server, Dynamo): exit 1

Servers catch `KvgateError` at the top of a command and print it as one line; anything else is a
bug and keeps its traceback. Errors about one request (a malformed body, an unknown model) are not
here: they become HTTP statuses (`kvgate.scheduling.request.SchedulingError`).
"""

from __future__ import annotations


class KvgateError(Exception):
    """An error kvgate reports to its user as a message, not a traceback."""

    exit_code = 1


class InvalidInput(KvgateError, ValueError):
    """Input that cannot be used; the message names the bad item."""

    exit_code = 2


class ConfigError(InvalidInput):
    """A setting is missing or invalid; the message says which and what to change."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class StartupError(KvgateError, RuntimeError):
    """A process or listener kvgate needs could not be started."""
