"""Errors raised by peftjax. Every error names the field, adapter or module path at fault."""

from __future__ import annotations


class PeftJaxError(Exception):
    """Base class of every error peftjax raises on bad input."""


class ConfigError(PeftJaxError, ValueError):
    """A config field has an invalid or unsupported value."""


class TargetError(PeftJaxError, ValueError):
    """A target, exclude, layer or pattern selection matched nothing or is malformed."""


class AdapterNameError(PeftJaxError, KeyError):
    """An adapter name is unknown, or already exists where a new one was asked for."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class MergeError(PeftJaxError, ValueError):
    """Merging or unmerging is impossible (nothing merged, non-finite result with safe=True)."""


class ShapeError(PeftJaxError, ValueError):
    """An array has the wrong shape for the module it belongs to."""


class UnsupportedModuleError(PeftJaxError, TypeError):
    """The method cannot adapt this kind of weight."""


class FormatError(PeftJaxError, ValueError):
    """An adapter file or directory is malformed, truncated or of an unsupported kind."""


class ArgumentTypeError(PeftJaxError, TypeError):
    """An argument has the wrong type (the message names the argument)."""


class AdapterNameTypeError(AdapterNameError, ArgumentTypeError):
    """An adapter name (or list of names) is not a str (a `AdapterNameError` and a `TypeError`)."""


class AdaptedArrayError(PeftJaxError, TypeError):
    """An adapter-carrying weight was used as a plain array (outside `pj.apply`)."""


class PartitionError(PeftJaxError, ValueError):
    """The ``trainable`` and ``frozen`` trees given to `pj.combine` do not fit together."""


class LayoutError(PeftJaxError, ValueError):
    """A weight's layout (how `inject` read it) disagrees with how the model uses it."""


class ShardingError(PeftJaxError, ValueError):
    """A sharding tree or `PartitionSpec` does not fit the params or the mesh."""
