"""Named exceptions. Each subclasses the builtin a ``peft`` user would catch.

Messages always name the file, key, module or shape at fault.
"""

from __future__ import annotations

__all__ = [
    "AdapterFileError",
    "AdapterNotFoundError",
    "ConfigError",
    "IncompatibleKeysError",
    "MergeError",
    "NoMatchingModuleError",
    "PeftcoreError",
    "ShapeMismatchError",
    "UnknownPeftTypeError",
    "UnsupportedLayerError",
]


class PeftcoreError(Exception):
    """Base class of every error peftcore raises on purpose."""


class ConfigError(PeftcoreError, ValueError):
    """A config field has a bad value or an invalid combination (``peft``'s ``__post_init__`` rules)."""


class UnknownPeftTypeError(ConfigError):
    """``peft_type`` names no registered method."""


class AdapterFileError(PeftcoreError, ValueError):
    """An adapter file exists but cannot be used: malformed JSON, truncated safetensors, bad dtype."""


class AdapterNotFoundError(AdapterFileError, FileNotFoundError):
    """An adapter directory or one of its files is missing."""


class ShapeMismatchError(PeftcoreError, ValueError):
    """An array does not have the shape the adapter needs."""


class IncompatibleKeysError(PeftcoreError, KeyError):
    """A state dict has missing or unexpected keys for the adapter it should fill."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class NoMatchingModuleError(PeftcoreError, ValueError):
    """No module of the model matches the config's targets."""


class MergeError(PeftcoreError, ValueError):
    """A merge cannot be done, or a safe merge produced non-finite weights."""


class UnsupportedLayerError(PeftcoreError, TypeError):
    """The method cannot adapt this kind of layer (or this layer configuration)."""
