"""PEFT's key naming: which module and parameter a key of ``adapter_model.safetensors`` names,
and how peftjax module paths map to PEFT module paths (``key_map``).

Keys are ``base_model.model.<PEFT module path>.<suffix>`` with the adapter name removed. The
suffix is one of the method's array suffixes (its registry row, `peftjax.methods`), or a whole
leaf: ``<method infix>.<param>`` for a method that copies whole leaves (LN tuning),
``base_layer.<param>`` for a base weight PEFT saves with a targeted, resized embedding, or a
plain ``<param>`` for a ``modules_to_save`` copy. Leaf names map to torch parameter names as
``kernel``/``embedding``/``scale``/``w`` -> ``weight`` and ``b`` -> ``bias``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import FormatError

__all__ = [
    "BASE_LAYER",
    "PREFIX",
    "KeyMap",
    "map_key",
    "split_key",
    "stacked_key_map",
    "torch_name",
]

PREFIX = "base_model.model."
BASE_LAYER = "base_layer"
KeyMap = Callable[..., str]
_TORCH_NAMES = {
    "kernel": "weight",
    "embedding": "weight",
    "scale": "weight",
    "w": "weight",
    "b": "bias",
}


def torch_name(leaf_name: str) -> str:
    """The torch parameter name of a Flax leaf name."""
    return _TORCH_NAMES.get(leaf_name, leaf_name)


def split_key(
    key: str, suffixes: Sequence[str], whole_infix: str | None = None
) -> tuple[str, str, str]:
    """``(kind, PEFT module path, suffix)`` of a file key.

    ``kind`` is ``adapter`` (one of the method's ``suffixes``), ``whole`` (a whole-leaf copy of
    the method under ``whole_infix``, LN tuning's ``ln_tuning_layers``), ``base`` (a
    ``base_layer`` weight PEFT saves with targeted embeddings) or ``copy`` (a
    ``modules_to_save`` parameter)."""
    k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    for suffix in suffixes:
        if k.endswith("." + suffix):
            return "adapter", k[: -len(suffix) - 1], suffix
    mod, _, param = k.rpartition(".")
    if whole_infix and (mod.endswith("." + whole_infix) or mod == whole_infix):
        return "whole", mod[: -len(whole_infix)].rstrip("."), param
    if mod.endswith("." + BASE_LAYER):
        return "base", mod[: -len(BASE_LAYER) - 1], param
    return "copy", mod, param


def stacked_key_map(layers_name: str = "layers") -> KeyMap:
    """A ``key_map`` for stacked (scanned) layers: ``(module_path, layer=None) -> PEFT path``.

    Unstacked paths are returned unchanged; a stacked path gets the layer index inserted after
    its ``layers_name`` segment: ``model.layers.self_attn.q_proj`` with layer 3 becomes
    ``model.layers.3.self_attn.q_proj``. This is the default ``key_map``.

    Args:
      layers_name: the path segment the layer index goes after (``"h"`` for GPT-2's
        ``transformer.h``).

    Returns:
      The ``key_map`` function, for `pj.save_pretrained` / `pj.load_pretrained` and the
      other functions that take ``key_map=``.

    Raises:
      FormatError: (raised by the returned function) a stacked path has no ``layers_name``
        segment.

    Example:

      >>> import peftjax as pj
      >>> key_map = pj.stacked_key_map()
      >>> key_map("model.layers.self_attn.q_proj", 3), key_map("lm_head")
      ('model.layers.3.self_attn.q_proj', 'lm_head')
      >>> pj.stacked_key_map("h")("transformer.h.attn.c_attn", 0)
      'transformer.h.0.attn.c_attn'
    """

    def key_map(path: str, layer: int | None = None) -> str:
        if layer is None:
            return path
        parts = path.split(".")
        if layers_name not in parts:
            raise FormatError(
                f"stacked module `{path}` has no `{layers_name}` segment to put the layer index "
                f"after; pass `key_map=pj.stacked_key_map(layers_name=...)` or your own "
                "`key_map(module_path, layer) -> PEFT module path`."
            )
        i = parts.index(layers_name)
        return ".".join([*parts[: i + 1], str(layer), *parts[i + 1 :]])

    return key_map


def map_key(key_map: KeyMap, path: str, layer: int | None) -> str:
    out = key_map(path) if layer is None else key_map(path, layer)
    if not isinstance(out, str):
        raise FormatError(f"`key_map({path!r})` returned {out!r}; it must return a str.")
    return out
