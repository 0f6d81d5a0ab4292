"""The forward of HF PEFT 0.21's adaption prompt (LLaMA-Adapter) for linen attention modules.

PEFT (``peft/tuners/adaption_prompt/layer.py``, ``AdaptedAttention.forward``) wraps a Llama
attention module and adds, per wrapped layer, a second attention over ``Lp`` learned prompt
tokens to the module's output::

    o      = attn(x, ...)                          # the normal output, o_proj included
    K_p    = k_proj(P), V_p = v_proj(P)            # biases included, no RoPE; [1, Lp, H_kv, d]
    K_p, V_p: each KV head repeated H / H_kv times consecutively (HF ``repeat_kv`` order)
    q      = RoPE(q_proj(x)) at the layer's own positions            # [B, S, H, d]
    S      = softmax_fp32(q K_p^T / sqrt(d)).astype(q.dtype)        # over Lp only, no mask
    o      = (o + o_proj(merge_heads((gate * S) @ V_p))).astype(q.dtype)

The gate is a raw scalar (no tanh) that multiplies the softmax probabilities, before ``@ V_p``.
``o_proj`` is called as a module, so its bias (if it has one) is added a second time, as in
PEFT; with ``attention_bias=False`` (Llama's default) ``gate = 0`` gives exactly the base model.

Here that forward runs as a Flax method interceptor, so a transformers Flax model (or any linen
model) is used unchanged::

    with nn.intercept_methods(interceptor({("model", "layers", "1", "self_attn"): (p, g)})):
        logits = model(ids, params=params).logits

The interceptor acts while a model is traced or run eagerly: under ``jax.jit`` enter the
``with`` block *inside* the jitted function (a function traced without it keeps its cached,
unadapted trace). ``prompt`` and ``gate`` may be tracers (jit, grad). Cached decoding
(``init_cache`` / transformers' Flax ``generate``) works: the adapter needs no cache, its queries
use the step's ``position_ids``.

Keys of ``targets`` are linen module paths (``module.path``): tuples of names from the root of
the applied module, without a ``"params"`` prefix. For ``transformers.FlaxLlamaForCausalLM``
layer ``i``'s attention is ``("model", "layers", str(i), "self_attn")`` (for ``FlaxLlamaModel``
it is ``("layers", str(i), "self_attn")``) — the same names as its param keys.

Which modules can be wrapped:

* **Flax Llama-family attention** (``FlaxLlamaAttention``, ``FlaxMistralAttention``): a module
  with ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` submodules, integer attributes
  ``num_heads`` and ``head_dim`` and a ``rotary_emb(key, query, position_ids)`` submodule
  returning ``(key, query)``. Queries are rotated with that module exactly as its ``__call__``
  does, at the ``position_ids`` the call received.
* **The adaption protocol**, for any other linen attention: the module defines

  ``adaption_queries(self, hidden_states, *args, **kwargs) -> [B, S, H, d]``
      the rotated query states, computed as its ``__call__`` computes them. It is called with
      the arguments of the intercepted ``__call__`` (``hidden_states`` first, then the rest as
      passed), or, when `adapter_output` is called directly without ``query_args`` /
      ``query_kwargs``, as ``adaption_queries(hidden_states, position_ids=position_ids)``.

  and has ``k_proj``, ``v_proj`` and ``o_proj``, either as submodules (setup or compact; a
  submodule that is not an attribute is applied from ``variables["params"][name]["kernel"]``
  and ``["bias"]`` as ``nn.Dense`` would), taking ``[..., hidden]`` to ``[..., H_kv * d]`` and
  ``[..., H * d]`` to ``[..., hidden]``. ``H`` and ``d`` are read from the queries, ``H_kv``
  from ``k_proj``'s output width; an integer ``num_key_value_heads`` attribute, if the module
  has one, must agree.

Anything else raises `UnsupportedModuleError` naming the module path and what is missing.

Dtypes: the prompt is cast to the dtype of the hidden states before ``k_proj`` / ``v_proj`` (in
PEFT it has the ``q_proj`` weight dtype, which equals the activations there); ``K_p`` and ``V_p``
are cast to the query dtype, the logits are computed in it, the softmax runs in float32 and is
cast back, and the gate is cast to the query dtype (PEFT multiplies by its ``[1]`` gate in the
weights' dtype; the two agree whenever the gate and the activations share a dtype). ``H_kv`` is
``k_proj``'s output width over ``d``; PEFT computes ``H / (k_proj.in / k_proj.out)``, the same
whenever ``hidden = H * d`` (always for the Flax Llama models).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ..errors import ArgumentTypeError, ShapeError, UnsupportedModuleError

__all__ = ["adapter_output", "interceptor"]

Path = tuple[str, ...]


def _where(attn: Any) -> str:
    path = getattr(attn, "path", None)
    return "/".join(path) if path else "<root>"


def _has_submodule(attn: Any, name: str) -> bool:
    try:
        sub = getattr(attn, name)
    except Exception:  # noqa: BLE001 - a linen attribute lookup may run setup and fail there
        return False
    return callable(sub)


def _params_of(attn: Any, name: str) -> Mapping[str, Any] | None:
    try:
        params = attn.variables.get("params", {})
    except Exception:  # noqa: BLE001 - unbound module
        return None
    sub = params.get(name) if hasattr(params, "get") else None
    if sub is None or "kernel" not in sub:
        return None
    return sub


def _project(attn: Any, name: str, x: jax.Array) -> jax.Array:
    """``attn.<name>(x)``; or, for a compact submodule, Dense applied from its params."""
    if _has_submodule(attn, name):
        return getattr(attn, name)(x)
    p = _params_of(attn, name)
    if p is None:
        raise UnsupportedModuleError(
            f"module `{_where(attn)}` has no `{name}`: neither a submodule attribute nor params "
            "with a kernel"
        )
    kernel = jnp.asarray(p["kernel"])
    if kernel.ndim != 2:
        raise UnsupportedModuleError(
            f"module `{_where(attn)}`: `{name}` is not a submodule attribute and its kernel has "
            f"shape {kernel.shape}; applying it from params needs a 2-D Dense kernel"
        )
    dtype = jnp.result_type(x, kernel)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if "bias" in p and p["bias"] is not None:
        y = y + jnp.asarray(p["bias"]).astype(dtype)
    return y


def _is_llama_family(attn: Any) -> bool:
    if not all(_has_submodule(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    if not _has_submodule(attn, "rotary_emb"):
        return False
    return all(isinstance(getattr(attn, n, None), int) for n in ("num_heads", "head_dim"))


def _missing(attn: Any) -> list[str]:
    """What a module lacks for both supported kinds (for the error message)."""
    missing = []
    for n in ("k_proj", "v_proj", "o_proj"):
        if not _has_submodule(attn, n) and _params_of(attn, n) is None:
            missing.append(f"`{n}`")
    if not callable(getattr(attn, "adaption_queries", None)):
        llama = []
        if not _has_submodule(attn, "q_proj"):
            llama.append("`q_proj`")
        if not _has_submodule(attn, "rotary_emb"):
            llama.append("`rotary_emb`")
        for n in ("num_heads", "head_dim"):
            if not isinstance(getattr(attn, n, None), int):
                llama.append(f"an int `{n}`")
        missing.append(
            "a method `adaption_queries(hidden_states, *args, **kwargs)` returning rotated "
            "queries [B, S, H, d] (or, for Flax Llama-family attention, " + ", ".join(llama) + ")"
        )
    return missing


def _queries(attn, hidden_states, position_ids, query_args, query_kwargs) -> jax.Array:
    if callable(getattr(attn, "adaption_queries", None)):
        if query_args is None and query_kwargs is None:
            q = attn.adaption_queries(hidden_states, position_ids=position_ids)
        else:
            q = attn.adaption_queries(hidden_states, *(query_args or ()), **(query_kwargs or {}))
        q = jnp.asarray(q)
        if q.ndim != 4 or q.shape[:2] != hidden_states.shape[:2]:
            raise ShapeError(
                f"module `{_where(attn)}`: `adaption_queries` returned shape {q.shape}; expected "
                f"[batch, seq, heads, head_dim] with batch, seq = {hidden_states.shape[:2]}"
            )
        return q
    if _is_llama_family(attn):
        if position_ids is None:
            raise ArgumentTypeError(
                f"module `{_where(attn)}`: `position_ids` is None; the adapter's queries are "
                "rotated at the layer's positions, so they must be given"
            )
        q = attn.q_proj(hidden_states)
        q = q.reshape(q.shape[:2] + (attn.num_heads, attn.head_dim))
        # the rotary module rotates (key, query) alike and elementwise; only the query is kept
        _, q = attn.rotary_emb(q, q, position_ids)
        return q
    raise UnsupportedModuleError(
        f"module `{_where(attn)}` ({type(attn).__name__}) cannot carry an adaption prompt: it "
        f"lacks {'; '.join(_missing(attn))}"
    )


def adapter_output(
    attn: Any,
    hidden_states: jax.Array,
    position_ids: jax.Array | None,
    prompt: jax.Array,
    gate: jax.Array | float,
    *,
    query_args: tuple | None = None,
    query_kwargs: Mapping[str, Any] | None = None,
) -> jax.Array:
    """The term PEFT's `AdaptedAttention` adds to a bound attention module's output.

    Args:
      attn: a *bound* linen attention module (inside ``apply`` or an interceptor, or
        ``module.bind(variables)``): Flax Llama-family attention or one following the
        adaption protocol (see the module docstring).
      hidden_states: the attention's input ``[B, S, hidden]``.
      position_ids: ``[B, S]`` token positions the layer rotates its queries at (the
        call's own ``position_ids``); may be None for a protocol module that ignores it.
      prompt: the adaption prompt ``[1, Lp, hidden]`` (PEFT ``adaption_prompt``).
      gate: the gate, a scalar or ``[1]`` (PEFT ``adaption_gate``).
      query_args, query_kwargs: for protocol modules, the arguments after ``hidden_states``
        that ``adaption_queries`` is called with (the interceptor passes the ``__call__``'s).

    Returns:
      ``o_proj(merge_heads((gate * S) @ V_p))`` of shape ``[B, S, hidden]`` in the query dtype.

    >>> import flax.linen as nn
    >>> class Attn(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(8, name="o_proj")(x)
    >>> adapter_output(Attn().bind({}), jnp.ones((1, 2, 8)), None, jnp.ones((1, 3, 8)), 0.5)
    Traceback (most recent call last):
    ...
    peftjax.errors.UnsupportedModuleError: module `<root>` (Attn) cannot carry an adaption ...
    """
    hidden_states = jnp.asarray(hidden_states)
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 3 or prompt.shape[0] != 1 or prompt.shape[-1] != hidden_states.shape[-1]:
        raise ShapeError(
            f"module `{_where(attn)}`: `prompt` has shape {prompt.shape}; expected "
            f"[1, adapter_len, {hidden_states.shape[-1]}]"
        )
    gate = jnp.asarray(gate)
    if gate.size != 1:
        raise ShapeError(
            f"module `{_where(attn)}`: `gate` has shape {gate.shape}; expected a scalar or [1]"
        )
    missing = [
        f"`{n}`"
        for n in ("k_proj", "v_proj", "o_proj")
        if not _has_submodule(attn, n) and _params_of(attn, n) is None
    ]
    if missing:
        raise UnsupportedModuleError(
            f"module `{_where(attn)}` ({type(attn).__name__}) cannot carry an adaption prompt: "
            f"it lacks {'; '.join(_missing(attn))}"
        )

    q = _queries(attn, hidden_states, position_ids, query_args, query_kwargs)  # [B, S, H, d]
    n_heads, head_dim = q.shape[2], q.shape[3]
    dtype = q.dtype

    p = prompt.astype(hidden_states.dtype)
    k = _project(attn, "k_proj", p)[0]  # [Lp, H_kv * d]
    v = _project(attn, "v_proj", p)[0]
    if k.shape[-1] % head_dim or v.shape != k.shape:
        raise ShapeError(
            f"module `{_where(attn)}`: k_proj / v_proj give widths {k.shape[-1]} / "
            f"{v.shape[-1]}, not one multiple of head_dim {head_dim}"
        )
    n_kv = k.shape[-1] // head_dim
    declared = getattr(attn, "num_key_value_heads", None)
    if n_heads % n_kv or (isinstance(declared, int) and declared != n_kv):
        raise ShapeError(
            f"module `{_where(attn)}`: {n_kv} key/value heads (k_proj width {k.shape[-1]} / "
            f"head_dim {head_dim}) do not divide {n_heads} query heads"
            + (f" or disagree with num_key_value_heads={declared}" if declared else "")
        )
    groups = n_heads // n_kv
    k = jnp.repeat(k.reshape(-1, n_kv, head_dim), groups, axis=1).astype(dtype)  # [Lp, H, d]
    v = jnp.repeat(v.reshape(-1, n_kv, head_dim), groups, axis=1).astype(dtype)

    scores = jnp.einsum("bqhd,khd->bhqk", q, k) / math.sqrt(head_dim)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
    probs = gate.reshape(()).astype(dtype) * probs
    out = jnp.einsum("bhqk,khd->bqhd", probs, v)
    out = out.reshape(out.shape[:2] + (n_heads * head_dim,))
    return _project(attn, "o_proj", out).astype(dtype)


def _normalize_path(key: Any) -> Path:
    if isinstance(key, str):
        return tuple(key.split("."))
    if isinstance(key, (tuple, list)) and all(isinstance(k, (str, int)) for k in key):
        return tuple(str(k) for k in key)
    raise ArgumentTypeError(
        f"`targets` key {key!r}: expected a module path, a tuple of names such as "
        "('model', 'layers', '1', 'self_attn') (or a '.'-joined string)"
    )


def _position_ids(module: Any, args: tuple, kwargs: dict) -> tuple[Any, Any, tuple, dict]:
    """(hidden_states, position_ids, rest_args, rest_kwargs) of an attention ``__call__``."""
    if "position_ids" in kwargs:
        pos = kwargs["position_ids"]
    else:
        pos = None
        try:
            bound = inspect.signature(type(module).__call__).bind(module, *args, **kwargs)
            pos = bound.arguments.get("position_ids")
        except (TypeError, ValueError):
            pass
    if args:
        return args[0], pos, tuple(args[1:]), dict(kwargs)
    rest = dict(kwargs)
    if "hidden_states" not in rest:
        raise ArgumentTypeError(
            f"module `{_where(module)}`: its __call__ got no positional argument and no "
            "`hidden_states`; the adaption prompt needs the attention's input"
        )
    return rest.pop("hidden_states"), pos, (), rest


def interceptor(targets: Mapping[Any, tuple[jax.Array, jax.Array | float]]) -> Callable:
    """A `flax.linen.intercept_methods` interceptor adding adaption prompts to attention outputs.

    Args:
      targets: ``{module path: (prompt, gate)}``; a path is a tuple of names as linen's
        ``module.path`` (e.g. ``("model", "layers", "1", "self_attn")`` for layer 1 of
        ``FlaxLlamaForCausalLM``), ``prompt`` is ``[1, Lp, hidden]`` and ``gate`` a scalar or
        ``[1]``.

    Returns:
      ``fn(next_fun, args, kwargs, context)``: for ``__call__`` of a module whose path is in
      ``targets`` it runs the call and adds `adapter_output` to its output (the first element
      when the call returns a tuple or list, e.g. FlaxLlamaAttention's ``(attn_output,)``),
      cast to the query dtype as PEFT does; every other call runs untouched.
    """
    if not isinstance(targets, Mapping):
        raise ArgumentTypeError(
            f"`targets`: expected a mapping {{module path: (prompt, gate)}}, got "
            f"{type(targets).__name__}"
        )
    table: dict[Path, tuple[Any, Any]] = {}
    for key, value in targets.items():
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ArgumentTypeError(
                f"`targets[{key!r}]`: expected a pair (prompt, gate), got {type(value).__name__}"
            )
        table[_normalize_path(key)] = (value[0], value[1])

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        path = tuple(getattr(module, "path", None) or ())
        if path not in table:
            return next_fun(*args, **kwargs)
        prompt, gate = table[path]
        outputs = next_fun(*args, **kwargs)
        hidden, pos, rest_args, rest_kwargs = _position_ids(module, args, kwargs)
        term = adapter_output(
            module, hidden, pos, prompt, gate, query_args=rest_args, query_kwargs=rest_kwargs
        )
        if isinstance(outputs, (tuple, list)):
            first = (outputs[0] + term).astype(term.dtype)
            if isinstance(outputs, list):
                return [first, *outputs[1:]]
            if hasattr(outputs, "_fields"):  # a NamedTuple
                return outputs._replace(**{outputs._fields[0]: first})
            return (first, *outputs[1:])
        return (outputs + term).astype(term.dtype)

    return intercept
