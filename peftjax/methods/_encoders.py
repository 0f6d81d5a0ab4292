"""P-tuning prompt encoders, as HF PEFT 0.21 (``peft/tuners/p_tuning/model.py``, ``PromptEncoder``),
as pure JAX functions.

PEFT's ``PromptEncoder`` owns ``embedding [T_tot, D]`` (N(0, 1); the caller owns it here) and,
unless ``inference_mode``, one of two heads, reparameterising the virtual-token embeddings
``x = embedding(arange(T_tot))``:

* **MLP** (``encoder_reparameterization_type="MLP"``, the default): ``mlp_head.0`` Linear(D, H) ->
  ReLU -> ``mlp_head.2`` Linear(H, H) -> ReLU -> ``mlp_head.4`` Linear(H, D). Always these three
  layers (``encoder_num_layers`` is ignored, with a warning), no dropout.
* **LSTM**: ``lstm_head`` = ``torch.nn.LSTM(D, H, num_layers, dropout, bidirectional=True,
  batch_first=True)`` over the T tokens as one sequence (zero initial state), then ``mlp_head.0``
  Linear(2H, 2H) -> ReLU -> ``mlp_head.2`` Linear(2H, D). ``dropout`` is the LSTM's own
  inter-layer dropout: on the output of every layer but the last, in training only; nothing
  else in either encoder has dropout.

Parameters are a flat dict ``{torch state-dict name: array in torch layout}``, exactly the
``PromptEncoder`` state dict minus ``embedding.weight``: Linear ``weight [out, in]`` (``y = x Wᵀ +
b``), LSTM ``weight_ih_l{k} [4H, in_k]`` (``in_0 = D``, ``in_k = 2H`` for k > 0), ``weight_hh_l{k}
[4H, H]``, ``bias_ih_l{k} [4H]``, ``bias_hh_l{k} [4H]``, and the same with a ``_reverse`` suffix for
the backward direction. Gate rows are in torch's order i, f, g, o.

All math is float32 (inputs and parameters are cast up; matmuls at ``Precision.HIGHEST``), and
the results are float32: PEFT casts the prompt to the model's dtype afterwards.

PEFT never saves these parameters: ``save_pretrained`` writes only ``prompt_embeddings`` = the
encoder output (in the train / eval mode current at save time).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError, ShapeError

__all__ = [
    "encoder_param_shapes",
    "init_lstm_encoder",
    "init_mlp_encoder",
    "lstm_encoder",
    "mlp_encoder",
]

_HI = jax.lax.Precision.HIGHEST
_KINDS = ("MLP", "LSTM")


def _kind(kind: str) -> str:
    k = getattr(kind, "value", kind)  # accepts PEFT's PromptEncoderReparameterizationType too
    if not isinstance(k, str) or k.upper() not in _KINDS:
        raise ConfigError(f"encoder_reparameterization_type must be one of {_KINDS}, got {kind!r}")
    return k.upper()


def _pos_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _lstm_names(k: int, suffix: str) -> tuple[str, ...]:
    return tuple(
        f"lstm_head.{p}_l{k}{suffix}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    )


def encoder_param_shapes(
    kind: str, token_dim: int, hidden: int | None, num_layers: int = 2
) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes (torch layout) of a PEFT P-tuning encoder, state-dict order.

    Args:
        kind: ``"MLP"`` or ``"LSTM"`` (PEFT's ``encoder_reparameterization_type``; any case).
        token_dim: D, the width of the virtual-token embeddings (and of the output).
        hidden: H, ``encoder_hidden_size``; ``None`` means ``token_dim``, as PEFT's config
            preparation does.
        num_layers: ``encoder_num_layers``, the LSTM's layer count; ignored for ``"MLP"`` (PEFT
            always builds three Linear layers).

    Returns:
        ``{name: shape}`` for every encoder parameter, ``embedding.weight`` excluded.

    Raises:
        ConfigError: an unknown ``kind`` or a non-positive size.

    Example:
        >>> encoder_param_shapes("MLP", 32, 16)
        {'mlp_head.0.weight': (16, 32), 'mlp_head.0.bias': (16,),
         'mlp_head.2.weight': (16, 16), 'mlp_head.2.bias': (16,),
         'mlp_head.4.weight': (32, 16), 'mlp_head.4.bias': (32,)}
        >>> s = encoder_param_shapes("LSTM", 32, 8, num_layers=2)
        >>> s["lstm_head.weight_ih_l0"], s["lstm_head.weight_ih_l1_reverse"], s["mlp_head.2.weight"]
        ((32, 32), (32, 16), (32, 16))
    """
    kind = _kind(kind)
    d = _pos_int("token_dim", token_dim)
    h = d if hidden is None else _pos_int("encoder_hidden_size", hidden)
    if kind == "MLP":
        return {
            "mlp_head.0.weight": (h, d),
            "mlp_head.0.bias": (h,),
            "mlp_head.2.weight": (h, h),
            "mlp_head.2.bias": (h,),
            "mlp_head.4.weight": (d, h),
            "mlp_head.4.bias": (d,),
        }
    n = _pos_int("encoder_num_layers", num_layers)
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(n):
        in_k = d if k == 0 else 2 * h
        for suffix in ("", "_reverse"):
            w_ih, w_hh, b_ih, b_hh = _lstm_names(k, suffix)
            shapes[w_ih] = (4 * h, in_k)
            shapes[w_hh] = (4 * h, h)
            shapes[b_ih] = (4 * h,)
            shapes[b_hh] = (4 * h,)
    shapes["mlp_head.0.weight"] = (2 * h, 2 * h)
    shapes["mlp_head.0.bias"] = (2 * h,)
    shapes["mlp_head.2.weight"] = (d, 2 * h)
    shapes["mlp_head.2.bias"] = (d,)
    return shapes


@partial(jax.jit, static_argnums=1)
def _uniform_draw(key: jax.Array, spec: tuple) -> tuple[jax.Array, ...]:
    # One flat U(-1, 1) draw cut into the parameters and scaled by their bounds: a single
    # compiled random program (one per shape would compile many).
    sizes = [math.prod(shape) for shape, _ in spec]
    flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, minval=-1.0, maxval=1.0)
    out, start = [], 0
    for (shape, b), size in zip(spec, sizes):
        out.append((flat[start : start + size] * jnp.float32(b)).reshape(shape))
        start += size
    return tuple(out)


def _uniform_init(
    key: jax.Array, shapes: Mapping[str, tuple[int, ...]], bound
) -> dict[str, jax.Array]:
    """An independent U(-b, b) float32 draw per parameter, ``b = bound(name, shape)``."""
    spec = tuple((tuple(shape), float(bound(name, shape))) for name, shape in shapes.items())
    return dict(zip(shapes, _uniform_draw(key, spec)))


def _linear_bound(shapes: Mapping[str, tuple[int, ...]]):
    # nn.Linear.reset_parameters: kaiming_uniform_(a=sqrt(5)) on W gives bound
    # sqrt(2 / (1 + 5)) * sqrt(3 / fan_in) = 1 / sqrt(fan_in); the bias uses 1 / sqrt(fan_in) too.
    def bound(name: str, shape: tuple[int, ...]) -> float:
        fan_in = shapes[name.rsplit(".", 1)[0] + ".weight"][1]
        return 1.0 / math.sqrt(fan_in)

    return bound


def init_mlp_encoder(key: jax.Array, token_dim: int, hidden: int | None) -> dict[str, jax.Array]:
    """Fresh MLP-encoder parameters, distributed as torch's default ``nn.Linear`` init.

    Every weight and bias of a Linear with fan-in ``in`` is U(-1/sqrt(in), 1/sqrt(in)) (torch's
    ``kaiming_uniform_(a=sqrt(5))`` and its bias rule). torch's exact random stream is not
    reproduced, only the distribution.

    Args:
        key: a JAX PRNG key.
        token_dim: D.
        hidden: H (``encoder_hidden_size``; ``None`` means D).

    Returns:
        ``{name: float32 array}``, names and shapes as `encoder_param_shapes` ``("MLP", ...)``.

    Example:
        >>> import jax
        >>> p = init_mlp_encoder(jax.random.key(0), 32, 16)
        >>> p["mlp_head.0.weight"].shape, p["mlp_head.4.bias"].shape
        ((16, 32), (32,))
        >>> bool(abs(p["mlp_head.0.weight"]).max() <= 32 ** -0.5)
        True
    """
    shapes = encoder_param_shapes("MLP", token_dim, hidden)
    return _uniform_init(key, shapes, _linear_bound(shapes))


def init_lstm_encoder(
    key: jax.Array, token_dim: int, hidden: int | None, num_layers: int
) -> dict[str, jax.Array]:
    """Fresh LSTM-encoder parameters (LSTM and its MLP head), distributed as torch's defaults.

    ``nn.LSTM.reset_parameters`` draws every weight and bias (both directions, every layer) from
    U(-1/sqrt(H), 1/sqrt(H)); the head's two Linear layers follow `init_mlp_encoder`'s rule
    (fan-in 2H for both). torch's exact random stream is not reproduced, only the distribution.

    Args:
        key: a JAX PRNG key.
        token_dim: D.
        hidden: H (``encoder_hidden_size``; ``None`` means D).
        num_layers: the LSTM's layer count (``encoder_num_layers``), >= 1.

    Returns:
        ``{name: float32 array}``, names and shapes as `encoder_param_shapes` ``("LSTM", ...)``.

    Example:
        >>> import jax
        >>> p = init_lstm_encoder(jax.random.key(0), 32, 8, 2)
        >>> p["lstm_head.weight_ih_l1"].shape, p["mlp_head.0.weight"].shape
        ((32, 16), (16, 16))
        >>> bool(abs(p["lstm_head.bias_hh_l0_reverse"]).max() <= 8 ** -0.5)
        True
    """
    shapes = encoder_param_shapes("LSTM", token_dim, hidden, num_layers)
    h = shapes["lstm_head.weight_hh_l0"][1]
    linear = _linear_bound(shapes)

    def bound(name: str, shape: tuple[int, ...]) -> float:
        return 1.0 / math.sqrt(h) if name.startswith("lstm_head.") else linear(name, shape)

    return _uniform_init(key, shapes, bound)


def _linear(params: Mapping[str, jax.Array], name: str, x: jax.Array) -> jax.Array:
    w = jnp.asarray(params[f"{name}.weight"], jnp.float32)
    b = jnp.asarray(params[f"{name}.bias"], jnp.float32)
    return jnp.matmul(x, w.T, precision=_HI) + b


def mlp_encoder(params: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    """PEFT's MLP prompt encoder: Linear(D, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, D).

    Args:
        params: the `init_mlp_encoder` dict (``mlp_head.{0,2,4}.{weight,bias}``, torch layout).
        x: the virtual-token embeddings ``[..., D]`` (PEFT: ``embedding.weight``, ``[T, D]``).

    Returns:
        float32 ``[..., D]``: PEFT's ``P`` (and its saved ``prompt_embeddings`` for ``x =
        embedding.weight``). Same in training and evaluation (this encoder has no dropout).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> p = init_mlp_encoder(jax.random.key(0), 32, 16)
        >>> mlp_encoder(p, jnp.ones((3, 32))).shape
        (3, 32)
    """
    return _mlp_core({k: params[k] for k in _MLP_KEYS}, x)


_MLP_KEYS = tuple(encoder_param_shapes("MLP", 1, 1))


@jax.jit
def _mlp_core(params: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    y = jnp.asarray(x, jnp.float32)
    y = jax.nn.relu(_linear(params, "mlp_head.0", y))
    y = jax.nn.relu(_linear(params, "mlp_head.2", y))
    return _linear(params, "mlp_head.4", y)


def _lstm_direction(params, names, x_tm: jax.Array, reverse: bool) -> jax.Array:
    """One direction of one layer over time-major ``x_tm [T, B, in]``; returns ``h [T, B, H]``.

    ``reverse=True`` runs from the last step to the first and stacks the outputs in the
    original time order (torch's backward direction: reversed input, re-reversed output).
    """
    w_ih, w_hh, b_ih, b_hh = (jnp.asarray(params[n], jnp.float32) for n in names)
    h_dim = w_hh.shape[1]
    # The input projection of every step at once, both biases added (torch adds b_ih and b_hh).
    xw = jnp.matmul(x_tm, w_ih.T, precision=_HI) + b_ih + b_hh  # [T, B, 4H]
    w_hh_t = w_hh.T

    def step(carry, xw_t):
        h, c = carry
        gates = xw_t + jnp.matmul(h, w_hh_t, precision=_HI)
        i, f, g, o = jnp.split(gates, 4, axis=-1)  # torch's gate order
        i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros(x_tm.shape[1:-1] + (h_dim,), jnp.float32)
    _, hs = jax.lax.scan(step, (zeros, zeros), xw, reverse=reverse)
    return hs


def _dropout(rng: jax.Array, p: float, x: jax.Array) -> jax.Array:
    # torch's F.dropout: zero with probability p, scale the kept values by 1 / (1 - p).
    if p == 1.0:
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(rng, 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0.0)


def lstm_encoder(
    params: Mapping[str, jax.Array],
    x: jax.Array,
    num_layers: int,
    dropout: float = 0.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """PEFT's LSTM prompt encoder: a bidirectional batch-first ``nn.LSTM``, then its MLP head.

    Per layer and direction, from a zero state, with the gate rows of ``W_ih x_t + b_ih + W_hh
    h_{t-1} + b_hh`` split as i, f, g, o: ``c_t = σ(f) c_{t-1} + σ(i) tanh(g)``, ``h_t = σ(o)
    tanh(c_t)``. The backward direction (``_reverse`` parameters) runs from the last token to
    the first and its outputs are put back in token order; a layer's output is ``[h_fwd ‖ h_bwd]``
    (2H), the next layer's input. The last layer's output goes through ``mlp_head.0``
    Linear(2H, 2H) -> ReLU -> ``mlp_head.2`` Linear(2H, D).

    Dropout is the LSTM's inter-layer dropout (``encoder_dropout``): applied to the output of
    every layer except the last, and only in training, which here means ``rng is not None``
    (``rng=None`` is PEFT's eval mode, whatever ``dropout`` is). With one layer it never acts.

    ``num_layers`` and ``dropout`` are Python values (static under ``jax.jit``).

    Args:
        params: the `init_lstm_encoder` dict (torch layout; layers ``0 .. num_layers - 1``).
        x: the virtual-token embeddings ``[T, D]`` as one sequence (PEFT's batch of 1), or
            ``[B, T, D]`` for B independent sequences (batch first, as PEFT's LSTM).
        num_layers: the LSTM's layer count; must match ``params``.
        dropout: the inter-layer dropout probability, in ``[0, 1]``.
        rng: a PRNG key for that dropout (training), or ``None`` (evaluation: no dropout).

    Returns:
        float32 ``[T, D]`` (or ``[B, T, D]``): PEFT's ``P``.

    Raises:
        ConfigError: ``dropout`` outside ``[0, 1]``, or ``num_layers`` not matching ``params``.
        ShapeError: ``x`` not of rank 2 or 3.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> p = init_lstm_encoder(jax.random.key(0), 32, 8, 2)
        >>> x = jax.random.normal(jax.random.key(1), (3, 32))
        >>> lstm_encoder(p, x, num_layers=2).shape
        (3, 32)
        >>> lstm_encoder(p, x, 2, dropout=0.5, rng=jax.random.key(2)).shape  # training
        (3, 32)
        >>> bool(jnp.allclose(lstm_encoder(p, x, 2, dropout=0.5), lstm_encoder(p, x, 2)))
        True
    """
    n = _pos_int("num_layers", num_layers)
    if f"lstm_head.weight_ih_l{n - 1}" not in params or f"lstm_head.weight_ih_l{n}" in params:
        raise ConfigError(f"num_layers={n} does not match the LSTM layers in params")
    p = float(dropout)
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"encoder_dropout must be in [0, 1], got {dropout!r}")
    x = jnp.asarray(x, jnp.float32)
    if x.ndim not in (2, 3):
        raise ShapeError(f"lstm_encoder takes x of shape [T, D] or [B, T, D], got {x.shape}")
    train = rng is not None and p > 0.0 and n > 1
    names = encoder_param_shapes("LSTM", 1, 1, n)  # the names only
    return _lstm_core(
        {k: params[k] for k in names}, x, rng if train else None, n, p if train else 0.0
    )


@partial(jax.jit, static_argnums=(3, 4))
def _lstm_core(params, x: jax.Array, rng: jax.Array | None, n: int, p: float) -> jax.Array:
    unbatched = x.ndim == 2
    y = x[:, None, :] if unbatched else jnp.swapaxes(x, 0, 1)  # time-major [T, B, D]
    for k in range(n):
        fwd = _lstm_direction(params, _lstm_names(k, ""), y, reverse=False)
        bwd = _lstm_direction(params, _lstm_names(k, "_reverse"), y, reverse=True)
        y = jnp.concatenate([fwd, bwd], axis=-1)
        if rng is not None and k < n - 1:  # torch: between layers only, in training only
            y = _dropout(jax.random.fold_in(rng, k), p, y)
    y = y[:, 0, :] if unbatched else jnp.swapaxes(y, 0, 1)
    y = jax.nn.relu(_linear(params, "mlp_head.0", y))
    return _linear(params, "mlp_head.2", y)
