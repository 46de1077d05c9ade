"""The one error every refused setting raises, in its own module so that the settings and the
methods (whose parameters are settings) can both raise it without importing each other."""

from __future__ import annotations

from typing import Any

__all__ = ["SettingsError"]


class SettingsError(ValueError):
    """An invalid SnapKV setting.

    Attributes:
        setting: name of the offending setting (a :class:`CompressionSettings` field, or the unknown
            key of a dict), so callers can map it to a CLI flag or an HTTP request field.
        value: the rejected value.
        allowed: human-readable allowed range.
    """

    def __init__(self, setting: str, value: Any, allowed: str) -> None:
        self.setting = setting
        self.value = value
        self.allowed = allowed
        super().__init__(f"snapkv {setting}={value!r} is invalid: {allowed}")

    def __reduce__(self):  # keep the attributes across pickling (multiprocess engines)
        return (type(self), (self.setting, self.value, self.allowed))
