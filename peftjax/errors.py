"""Errors raised by peftjax. Every error names the field, adapter or module path at fault."""

from __future__ import annotations


class PeftJaxError(Exception):
    """Base class of every error peftjax raises on bad input.

    Every peftjax error also derives from the built-in exception that fits it (``ValueError``,
    ``TypeError`` or ``KeyError``), so ``except ValueError`` keeps working; catch
    ``PeftJaxError`` to handle any of them.

    Example:

      >>> import peftjax as pj
      >>> try:
      ...     pj.LoraConfig(r=0)
      ... except pj.PeftJaxError as err:
      ...     print(type(err).__name__, isinstance(err, ValueError))
      ConfigError True
    """


class ConfigError(PeftJaxError, ValueError):
    """A config field has an invalid or unsupported value (a ``ValueError``).

    Raised when a config is built (``LoraConfig(...)``, ``config_from_dict``, ``from_dict``)
    with a bad value or with a PEFT field peftjax does not implement set to a non-default
    value; and by functions whose options do not fit the adapters they are given
    (``inject``, ``add_weighted_adapter``, ``convert_to_lora``, ``hotswap``, ``quantize``,
    ``load_pretrained``, the AdaLoRA allocator...). The message names the field and the value.

    Example:

      >>> import peftjax as pj
      >>> pj.LoraConfig(r=-1)
      Traceback (most recent call last):
      ...
      peftjax.errors.ConfigError: ...
    """


class TargetError(PeftJaxError, ValueError):
    """A target, exclude, layer or pattern selection matched nothing or is malformed.

    Raised (a ``ValueError``) by ``inject`` and ``inject_from_state_dict`` when
    ``target_modules`` / ``layers_to_transform`` / ``rank_pattern`` select no module or a
    module that cannot be found, by ``quantize`` when ``targets`` match nothing, by ``hotswap``
    when the new adapter adapts modules the old one does not, and by the tuner functions when a
    module path is unknown.
    """


class AdapterNameError(PeftJaxError, KeyError):
    """An adapter name is unknown, or already exists where a new one was asked for.

    Raised (a ``KeyError``) by every function that takes an adapter name (``set_active``,
    ``merge``, ``delete``, ``save_pretrained``, ``add_weighted_adapter``, ``hotswap``,
    ``apply``...) when the tree has no adapter of that name, and by ``inject`` /
    ``load_pretrained`` / ``add_weighted_adapter`` when the new name is already taken. Unlike a
    plain ``KeyError``, its message is printed unquoted.
    """

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class MergeError(PeftJaxError, ValueError):
    """Merging or unmerging is impossible (nothing merged, non-finite result with safe=True).

    Raised (a ``ValueError``) by ``merge`` / ``merge_and_unload`` (a non-finite merged weight
    with ``safe=True``, a method that cannot merge, e.g. prompt learning, or a quantized base),
    by ``unmerge`` when nothing is merged, and by functions that need unmerged adapters
    (``delete``, ``convert_to_lora``, ``hotswap``, ``prepare_hotswap``, the AdaLoRA allocator,
    ``AdapterCheckpointer.restore``).
    """


class ShapeError(PeftJaxError, ValueError):
    """An array has the wrong shape for the module it belongs to.

    Raised (a ``ValueError``) when loaded or given arrays do not fit their module:
    ``load_pretrained`` / ``inject_from_state_dict`` (a tensor of another shape),
    ``hotswap`` (a rank above the prepared one), ``combine`` (halves from another injection),
    ``quantize`` (a block size that does not divide a weight), ``AdapterCheckpointer.restore``
    and the prompt-learning inputs (``prompt_inputs``). The message names the key or module,
    the expected shape and the one found.
    """


class UnsupportedModuleError(PeftJaxError, TypeError):
    """The method cannot adapt this kind of weight.

    Raised (a ``TypeError``) by ``inject`` when a targeted weight is of a kind the method does
    not support (e.g. an embedding for IA3, a conv for VeRA), by ``convert_to_lora`` for
    modules that cannot be converted, and by ``apply`` when a weight is used in a way its
    adapter cannot follow.
    """


class FormatError(PeftJaxError, ValueError):
    """An adapter file or directory is malformed, truncated or of an unsupported kind.

    Raised (a ``ValueError``) by ``load_pretrained``, ``read_adapter``, ``inspect_adapter`` and
    ``hotswap`` (a missing, truncated or pickle-only ``adapter_model`` file, a bad
    ``adapter_config.json``, an unknown ``peft_type``, keys that match no module) and by
    ``AdapterCheckpointer`` (an unreadable checkpoint).

    Example:

      >>> import tempfile, peftjax as pj
      >>> with tempfile.TemporaryDirectory() as d:
      ...     pj.read_adapter(d)
      Traceback (most recent call last):
      ...
      peftjax.errors.FormatError: ...
    """


class ArgumentTypeError(PeftJaxError, TypeError):
    """An argument has the wrong type (the message names the argument).

    Raised (a ``TypeError``) by public functions given an argument of the wrong kind: a
    ``key`` that is neither a PRNG key nor an int, ``layouts`` that are not ``Layout`` values,
    a non-bool ``trainable`` / ``activate`` / ``safe`` (``inject``, ``set_trainable``,
    ``merge``), a bad ``target_rank`` (``prepare_hotswap``), weights of the wrong type
    (``add_weighted_adapter``), a module without a float weight matrix (``quantize``), a
    ``base`` leaf that is neither a ``Sharding`` nor a ``PartitionSpec`` (``shardings``)...
    """


class AdapterNameTypeError(AdapterNameError, ArgumentTypeError):
    """An adapter name (or list of names) is not a str (an `AdapterNameError` and a ``TypeError``).

    Raised by the functions that take adapter names (``set_active``, ``merge``, ``delete``,
    ``set_trainable``, ``hotswap``, the tuner functions...) when a name is not a ``str``.
    """


class AdaptedArrayError(PeftJaxError, TypeError):
    """An adapter-carrying weight was used as a plain array (outside `pj.apply`).

    Raised (a ``TypeError``) when an ``Adapted`` leaf is converted to an array (``jnp.asarray``,
    ``np.asarray``, ``float``, a ``jax.numpy`` function) outside a function wrapped by ``pj.apply``.
    The message says to wrap the model call in ``pj.apply`` or to merge the adapters.
    """


class PartitionError(PeftJaxError, ValueError):
    """The ``trainable`` and ``frozen`` trees given to `pj.combine` do not fit together.

    Raised (a ``ValueError``) by ``combine`` when ``frozen`` is not the other half of the
    ``partition`` that produced ``trainable`` (swapped arguments, another tree structure, frozen
    arrays in ``trainable``). Arrays of another shape (e.g. another rank) raise `ShapeError`.
    """


class LayoutError(PeftJaxError, ValueError):
    """A weight's layout (how `inject` read it) disagrees with how the model uses it.

    Raised (a ``ValueError``) by functions wrapped with ``apply`` when a dense weight is
    contracted only over the axes its layout calls outputs, e.g. an ``(out, in)`` kernel used
    as ``x @ W.T`` but injected without ``Layout(transposed=True)``. The message names the
    module and the ``Layout`` to pass.
    """


class ShardingError(PeftJaxError, ValueError):
    """A sharding tree or `PartitionSpec` does not fit the params or the mesh.

    Raised (a ``ValueError``) by ``shardings`` when ``base`` does not have the params'
    structure, a ``PartitionSpec`` names an axis the mesh lacks, uses an axis twice or does
    not divide an array's shape, or ``rank_axis`` is not a mesh axis.
    """
