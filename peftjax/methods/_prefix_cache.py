"""Prefix tuning into transformers' Flax causal LMs, as HF PEFT 0.21 does it: a pre-filled KV cache.

PEFT's ``get_prompt`` turns the prefix ``[T, 2·L·H_kv·d]`` (saved as ``prompt_embeddings``) into a
cache: view ``[B, T, 2L, H_kv, d]``; layer ``l`` takes slot ``2l`` as its keys and ``2l + 1`` as
its values. The keys go in as they are (no RoPE). The forward then passes
``attention_mask = [1_T; mask]`` and, with a cache of length ``T``, the real tokens sit at
positions ``T .. T+N-1`` (a given ``position_ids`` gets ``+T``); logits and labels keep length N.

transformers' Flax models (``FlaxLlamaForCausalLM``, ``FlaxGPT2LMHeadModel`` and their bare
``FlaxLlamaModel`` / ``FlaxGPT2Model``) take a cache from ``init_cache(B, max_len)``: per layer
``cached_key`` / ``cached_value`` ``[B, max_len, H_kv, d]`` in the module's compute dtype (the
update is a ``lax.dynamic_update_slice``, which needs equal dtypes) and ``cache_index`` (int32).
A call with ``past_key_values`` needs ``position_ids`` and an ``attention_mask`` of length
``max_len``; it writes the N new keys at ``cache_index`` and returns logits for those N tokens
only. So the cache is made for ``max_len = T + N``, rows ``:T`` hold the prefix,
``cache_index = T``, and the mask is ``[1_T; mask]`` — then the model's causal mask (rows from
``T``) and its RoPE at ``position_ids`` reproduce PEFT's torch forward. ``T + N`` must not pass
``max_position_embeddings``: the Flax causal mask is a ``dynamic_slice`` of a table of that size
and would clamp silently.

Use::

    L, H_kv, d = kv_layout(model.config)
    kw = hf_prefix_inputs(model, prompt_embeddings, ids, mask,
                          num_layers=L, num_kv_heads=H_kv, head_dim=d)
    logits = model(**kw, params=params).logits          # [B, N, V]: the real tokens only
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..errors import ShapeError, UnsupportedModuleError

# model_type -> (candidate roots of the layer collection in the cache, attention module's name)
_FAMILIES: dict[str, tuple[tuple[tuple[str, ...], ...], str]] = {
    "llama": ((("model", "layers"), ("layers",)), "self_attn"),
    "gpt2": ((("transformer", "h"), ("h",)), "attn"),
}
_SUPPORTED = (
    "llama (FlaxLlamaForCausalLM, FlaxLlamaModel), gpt2 (FlaxGPT2LMHeadModel, FlaxGPT2Model)"
)

__all__ = ["hf_prefix_inputs", "kv_layout"]


def _model_type(config: Any) -> str:
    mt = getattr(config, "model_type", None)
    if mt not in _FAMILIES:
        raise UnsupportedModuleError(
            f"prefix tuning: model_type {mt!r} is not supported; supported: {_SUPPORTED}"
        )
    return mt


def _num_layers_of(config: Any) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(config, name, None)
        if v is not None:
            return int(v)
    raise UnsupportedModuleError(
        "prefix tuning: the config names no layer count (num_hidden_layers / n_layer)"
    )


def kv_layout(config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers config, PEFT's rule.

    Llama: ``num_hidden_layers``, ``num_key_value_heads`` (else ``num_attention_heads``),
    ``config.head_dim`` if set, else ``hidden_size // num_attention_heads``. GPT-2: ``n_layer``,
    ``n_head``, ``n_embd // n_head``.
    """
    mt = _model_type(config)
    if mt == "gpt2":
        n_head = int(config.n_head)
        return int(config.n_layer), n_head, int(config.n_embd) // n_head
    heads = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None)
    kv = heads if kv is None else int(kv)
    hd = getattr(config, "head_dim", None)
    hd = int(config.hidden_size) // heads if hd is None else int(hd)
    return int(config.num_hidden_layers), kv, hd


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _layer_paths(model: Any, shapes: Any, n_layers: int) -> list[tuple[str, ...]]:
    """The cache path of each layer's attention module (``shapes``: ``init_cache``'s tree)."""
    roots, attn = _FAMILIES[_model_type(model.config)]
    for root in roots:
        coll = _get(shapes, root)
        if isinstance(coll, dict):
            break
    else:
        raise UnsupportedModuleError(
            f"prefix tuning: {type(model).__name__}'s cache has none of the layer collections "
            f"{['/'.join(r) for r in roots]}; supported: {_SUPPORTED}"
        )
    found = sorted((k for k in coll if k.isdigit()), key=int)
    if found != [str(i) for i in range(len(found))] or len(found) != n_layers:
        raise ShapeError(
            f"prefix tuning: num_layers: the model's cache has {len(found)} layers under "
            f"{'/'.join(root)}, its config says {n_layers}"
        )
    paths = []
    for k in found:
        entry = _get(coll, (k, attn))
        if not isinstance(entry, dict) or "cached_key" not in entry:
            raise UnsupportedModuleError(
                f"prefix tuning: no cached_key under {'/'.join(root + (k, attn))}; "
                f"supported: {_SUPPORTED}"
            )
        paths.append(root + (k, attn))
    return paths


def _plain(tree: Any) -> Any:
    """A (possibly frozen) mapping tree as nested plain dicts."""
    if hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def hf_prefix_inputs(
    model: Any,
    prefix: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    num_kv_heads: int,
    head_dim: int,
    num_layers: int,
    position_ids: Any = None,
) -> dict[str, Any]:
    """Keyword arguments for ``model(**kw, params=params)`` that run PEFT's prefix tuning.

    ``prefix``: ``[T, 2·L·H_kv·d]`` (shared by the batch) or ``[B, T, 2·L·H_kv·d]``, PEFT's flat
    layout (``prompt_embeddings``). ``input_ids`` ``[B, N]``; ``attention_mask`` ``[B, N]`` or
    None (all ones); ``position_ids`` (broadcastable to ``[B, N]``) or None (``T + arange(N)``).
    Returns ``input_ids``, ``attention_mask`` ``[B, T+N]``, ``position_ids`` ``[B, N]`` and
    ``past_key_values`` (the model's ``init_cache(B, T+N)`` tree, rows ``:T`` of every layer's
    ``cached_key`` / ``cached_value`` filled from the prefix in the cache dtype, ``cache_index =
    T``). Only jnp ops on the arrays and no concrete ``init_cache``: traceable under `jax.jit` and
    differentiable in ``prefix``. The model returns logits for the N real tokens only.
    """
    config = getattr(model, "config", None)
    _model_type(config)
    if not callable(getattr(model, "init_cache", None)):
        raise UnsupportedModuleError(
            f"prefix tuning: {type(model).__name__} has no init_cache; supported: {_SUPPORTED}"
        )
    cfg_layers = _num_layers_of(config)
    if int(num_layers) != cfg_layers:
        raise ShapeError(
            f"prefix tuning: num_layers={num_layers} but the model has {cfg_layers} layers"
        )
    L, H, d = int(num_layers), int(num_kv_heads), int(head_dim)

    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ShapeError(
            f"prefix tuning: input_ids must be [B, N], got shape {tuple(input_ids.shape)}"
        )
    B, N = input_ids.shape
    prefix = jnp.asarray(prefix)
    if prefix.ndim == 2:
        prefix = jnp.broadcast_to(prefix[None], (B,) + prefix.shape)
    elif prefix.ndim != 3 or prefix.shape[0] != B:
        raise ShapeError(
            f"prefix tuning: prefix must be [T, width] or [B={B}, T, width], "
            f"got shape {tuple(prefix.shape)}"
        )
    T, width = prefix.shape[1], prefix.shape[2]
    if width != 2 * L * H * d:
        raise ShapeError(
            f"prefix tuning: prefix width {width} != 2*num_layers*num_kv_heads*head_dim = "
            f"2*{L}*{H}*{d} = {2 * L * H * d}"
        )
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and T + N > int(max_pos):
        raise ShapeError(
            f"prefix tuning: num_virtual_tokens + sequence length = {T}+{N} exceeds the model's "
            f"max_position_embeddings {max_pos} (its causal mask and position table end there)"
        )

    if attention_mask is None:
        mask = jnp.ones((B, N), jnp.int32)
    else:
        mask = jnp.asarray(attention_mask)
        if mask.shape != (B, N):
            raise ShapeError(
                f"prefix tuning: attention_mask must be [B, N] = {(B, N)}, got {tuple(mask.shape)}"
            )
    mask = jnp.concatenate([jnp.ones((B, T), mask.dtype), mask], axis=1)

    if position_ids is None:
        pos = jnp.broadcast_to(T + jnp.arange(N, dtype=jnp.int32)[None], (B, N))
    else:
        pos = jnp.asarray(position_ids)
        try:
            pos = jnp.broadcast_to(pos, (B, N))
        except ValueError as e:
            raise ShapeError(
                f"prefix tuning: position_ids of shape {tuple(pos.shape)} do not broadcast to "
                f"[B, N] = {(B, N)}"
            ) from e
        pos = pos + T

    max_len = T + N
    shapes = _plain(jax.eval_shape(lambda: model.init_cache(B, max_len)))
    paths = _layer_paths(model, shapes, cfg_layers)
    kv = prefix.reshape(B, T, 2 * L, H, d)  # Flax's cache layout is [B, len, H_kv, d]: no permute
    # every leaf of the model's own structure, zeros where the prefix does not go
    cache = jax.tree_util.tree_map(lambda sd: jnp.zeros(sd.shape, sd.dtype), shapes)
    for l, path in enumerate(paths):
        entry = _get(shapes, path)
        for c, name in enumerate(("cached_key", "cached_value")):
            sd = entry[name]
            if tuple(sd.shape) != (B, max_len, H, d):
                field = "num_kv_heads" if sd.shape[2] != H else "head_dim"
                raise ShapeError(
                    f"prefix tuning: {field}: {'/'.join(path)}/{name} is {tuple(sd.shape)} "
                    f"([B, T+N, H_kv, d]), the prefix gives {(B, max_len, H, d)}"
                )
            part = kv[:, :, 2 * l + c].astype(sd.dtype)
            _set(
                cache,
                path + (name,),
                jnp.concatenate([part, jnp.zeros((B, N, H, d), sd.dtype)], axis=1),
            )
        _set(cache, path + ("cache_index",), jnp.array(T, dtype=entry["cache_index"].dtype))
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": pos,
        "past_key_values": cache,
    }
