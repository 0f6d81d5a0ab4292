"""``pj.prompt_inputs``: the model call's keyword arguments with the active prompt-learning
adapter's virtual tokens or prefix in place (routes: `peftjax.methods.prompt`)."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._tree import walk
from .errors import ArgumentTypeError, ConfigError, ShapeError
from .methods import PROMPT
from .node import is_adapted

__all__ = ["active_prompt", "prompt_inputs"]

#: PEFT's label for positions without a target (virtual tokens)
IGNORE_INDEX = -100


def active_prompt(params):
    """``(name, spec, arrays, module)`` of the active prompt-learning adapter with a ``tokens``
    or ``prefix`` route, or ``None``. Two active ones are an error (PEFT runs one at a time)."""
    found = {}
    for l in walk(params)[0]:
        node = l.value
        if not is_adapted(node):
            continue
        for name, spec, arrays in node.pending():
            if spec.role == PROMPT and spec.route in ("tokens", "prefix"):
                found[name] = (name, spec, arrays, l.module)
    if len(found) > 1:
        raise ConfigError(
            f"`prompt_inputs`: prompt adapters {sorted(found)} are active together; PEFT runs "
            "one prompt-learning adapter at a time: `pj.set_active(params, name)`."
        )
    return next(iter(found.values()), None)


def _ids(name: str, x, shape=None, *, integer=True):
    if x is None:
        return None
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = np.asarray(x)
        except Exception:  # noqa: BLE001
            raise ArgumentTypeError(
                f"`{name}`: expected an array, got {type(x).__name__}."
            ) from None
    if integer and not jnp.issubdtype(x.dtype, jnp.integer):
        raise ArgumentTypeError(f"`{name}`: expected integer ids, got dtype {x.dtype}.")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ShapeError(f"`{name}` has shape {list(x.shape)}; `input_ids` has {list(shape)}.")
    return x


def prompt_inputs(
    params,
    input_ids,
    attention_mask=None,
    *,
    labels=None,
    task_ids=None,
    model=None,
    token_type_ids=None,
) -> dict[str, Any]:
    """Keyword arguments for the model call with the active prompt adapter in place, as PEFT.

    Token methods (prompt tuning, p-tuning, multitask prompt tuning): ``T`` virtual ids are
    prepended to ``input_ids`` (`pj.apply` looks them up in the adapter's virtual embeddings),
    ``attention_mask`` gets ``T`` ones in front, ``labels`` ``T`` times ``-100`` and
    ``token_type_ids`` ``T`` zeros; positions are the model's default ``arange(T + N)`` (PEFT
    drops ``position_ids``). The logits then have ``T + N`` positions, the last ``N`` for the
    real tokens. Prefix tuning: ``model``'s KV cache pre-filled with the prefix (unrotated),
    ``attention_mask`` extended, ``position_ids`` ``T..T+N-1`` (PEFT's); ``labels`` unchanged.
    Params without an active prompt adapter (or with only adaption prompt, which needs no
    inputs) give the arguments unchanged.

    Args:
      params: the tree carrying the adapter.
      input_ids: ``[B, N]`` integer token ids.
      attention_mask: ``[B, N]`` (1 = token, 0 = padding) or ``None``.
      labels: ``[B, N]`` target ids (``-100`` = ignore) or ``None``.
      task_ids: ``[B]`` task of each example: required by multitask prompt tuning.
      model: the model object, for prefix tuning (transformers' Flax models, or a model whose
        ``__call__`` takes ``prefix_key_values``).
      token_type_ids: ``[B, N]`` (BERT-style models) or ``None``.

    Returns:
      A dict with ``input_ids`` and whichever of ``attention_mask``, ``labels``,
      ``token_type_ids``, ``position_ids``, ``past_key_values`` / ``prefix_key_values`` apply;
      ``pj.apply(lambda p, b: model(**b, params=p).logits)(params, batch)`` gives PEFT's logits.
      Traceable and differentiable w.r.t. the prompt parameters.

    Raises:
      ShapeError, ArgumentTypeError: inputs of the wrong shape or dtype.
      ConfigError: ``task_ids`` missing (multitask) or given to another method, two active
        prompt adapters, prefix tuning without a ``model`` that takes a cache.

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> p = {"embed_tokens": {"embedding": jnp.ones((10, 4))}}
      >>> p = pj.inject(p, pj.PromptTuningConfig(num_virtual_tokens=2), key=jax.random.key(0))
      >>> b = pj.prompt_inputs(p, jnp.array([[3, 4, 5]]), jnp.ones((1, 3), jnp.int32))
      >>> b["input_ids"].tolist(), b["attention_mask"].tolist()
      ([[10, 11, 3, 4, 5]], [[1, 1, 1, 1, 1]])
    """
    input_ids = _ids("input_ids", input_ids)
    if input_ids.ndim != 2:
        raise ShapeError(f"`input_ids` must be [batch, tokens]; got shape {list(input_ids.shape)}.")
    shape = tuple(input_ids.shape)
    attention_mask = _ids("attention_mask", attention_mask, shape, integer=False)
    labels = _ids("labels", labels, shape)
    token_type_ids = _ids("token_type_ids", token_type_ids, shape)
    found = active_prompt(params)
    out: dict[str, Any] = {"input_ids": input_ids}
    for k, v in (("attention_mask", attention_mask), ("labels", labels)):
        if v is not None:
            out[k] = v
    if token_type_ids is not None:
        out["token_type_ids"] = token_type_ids
    if found is None:
        if task_ids is not None:
            raise ConfigError("`task_ids`: no active multitask prompt adapter takes them.")
        return out
    name, spec, arrays, module = found
    groups = spec.groups
    if task_ids is None:
        if groups > 1 or spec.needs_task_ids:
            raise ConfigError(
                f"`task_ids`: adapter {name!r} ({spec.method}) has {groups} task prompts and "
                "needs `task_ids` ([batch] ints), one task per example (PEFT requires them too)."
            )
    else:
        if not spec.needs_task_ids:
            raise ConfigError(
                f"`task_ids`: adapter {name!r} is {spec.method}, which takes no task ids."
            )
        task_ids = _ids("task_ids", task_ids)
        if tuple(task_ids.shape) != (shape[0],):
            raise ShapeError(
                f"`task_ids` has shape {list(task_ids.shape)}; expected [{shape[0]}] (one per "
                "example)."
            )
        if not isinstance(task_ids, jax.core.Tracer):
            t = np.asarray(task_ids)
            if t.size and (t.min() < 0 or t.max() >= groups):
                raise ConfigError(
                    f"`task_ids`={t.tolist()}: adapter {name!r} has tasks 0..{groups - 1} "
                    f"(`num_tasks`={groups})."
                )
    b, n_tok = shape[0], spec.n_tokens
    if spec.route == "tokens":
        vocab = int(spec.shape[0])
        group = jnp.zeros((b,), jnp.int32) if task_ids is None else task_ids.astype(jnp.int32)
        virt = vocab + group[:, None] * n_tok + jnp.arange(n_tok, dtype=jnp.int32)[None, :]
        out["input_ids"] = jnp.concatenate([virt.astype(input_ids.dtype), input_ids], axis=1)
        if attention_mask is not None:
            ones = jnp.ones((b, n_tok), attention_mask.dtype)
            out["attention_mask"] = jnp.concatenate([ones, attention_mask], axis=1)
        if labels is not None:
            pad = jnp.full((b, n_tok), IGNORE_INDEX, labels.dtype)
            out["labels"] = jnp.concatenate([pad, labels], axis=1)
        if token_type_ids is not None:
            zeros = jnp.zeros((b, n_tok), token_type_ids.dtype)
            out["token_type_ids"] = jnp.concatenate([zeros, token_type_ids], axis=1)
        return out
    # "prefix": the model's own cache, or a `prefix_key_values` keyword
    prefix = spec.prefix(arrays)  # [T, 2 * L * D_kv] in PEFT's flat layout
    return spec.prefix_inputs(model, prefix, out, attention_mask)


def takes_keyword(fn, name: str) -> bool:
    """Whether callable ``fn`` accepts keyword ``name`` (or ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return any(
        p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    )
