"""The lab config's error (its own module: :mod:`bridge.labconfig` and
:mod:`bridge.labmqtt` both raise it)."""

from __future__ import annotations

from safety.yamldoc import ConfigError

__all__ = ["LabConfigError"]


class LabConfigError(ConfigError):
    """An invalid lab config: ``<file>:<line>: <field>: <problem>``."""
