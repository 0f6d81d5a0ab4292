"""QLoRA's frozen base: weights stored as 4-bit NF4 (bitsandbytes' format) or int8.

`quantize` replaces targeted float weight matrices by `Quantized` pytree nodes; `pj.inject`,
`pj.apply`, `pj.partition`, `pj.count_parameters` and `pj.merge_and_unload` accept them.
Inside `pj.apply` each `Quantized` weight stays packed until a matmul reads it: the decode and
the matmul run in one ``jax.checkpoint``, so under ``jax.grad`` the residual is the packed
weight and the backward decodes it again (no float copy of the weight is saved;
`tests/test_quantize.py` checks the saved residuals). A stacked (``nn.scan``) quantized weight
is decoded whole before the scan.

NF4 is bitsandbytes' ``quantize_4bit(quant_type="nf4")`` bit for bit (`tests/test_quantize.py`
checks it against a fixture made by bitsandbytes 0.50.2): the weight is flattened (row-major)
and cut into blocks of ``block_size``; each block is scaled by ``1 / absmax`` (float32, a
reciprocal then a product, as bitsandbytes), clipped to ``[-1, 1]`` and each value takes the
index of the nearest of the 16 NF4 codes (a value exactly between two codes takes the lower,
``torch.bucketize``'s rule); two codes share a byte, the first in the high nibble. With
``double_quant`` (bitsandbytes' ``compress_statistics``) the float32 absmax are stored as 8
bits: their mean (``offset``) is subtracted and the rest is quantized blockwise in blocks of
256 with bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map()``).

int8: symmetric absmax scales per output channel: for a ``(..., in, out)`` kernel one float32
scale per ``(..., out)`` column, ``q = round(w / scale)`` in ``[-127, 127]``.

Storage: ``packed`` keeps the weight's leading axes when the last axis is a multiple of
``block_size`` (``(..., out // 2)``; its row-major flattening is bitsandbytes' flat buffer), so
a scanned ``(layers, in, out)`` kernel is stored per layer; else it is flat.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import GetAttrKey, register_pytree_with_keys_class

from .errors import ArgumentTypeError, ConfigError, ShapeError, TargetError

__all__ = ["SCHEMES", "Quantized", "dequantize", "is_quantized", "quantize"]

SCHEMES = ("nf4", "int8")

#: bitsandbytes' NF4 code (``get_4bit_type("nf4")``; QLoRA, Dettmers et al. 2023, appendix E).
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)

_DQ_BLOCK = 256  # bitsandbytes' block size for the double quantization of the absmax


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` as bitsandbytes' map gets it on
    CPU: a float32 step, the first half counted up from ``start`` and the second half down
    from ``end``, each value one fused multiply-add (computed exactly in float64 here, then
    rounded once)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    up = np.float64(start32) + step * i
    down = np.float64(end32) - step * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


@functools.lru_cache(maxsize=1)
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(True, 7, 8)``): 256 sorted
    float32 values, dynamic exponent and fraction (Dettmers 2015, 8-bit approximations)."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = 2 ** (i + non_sign - max_exp) + 1
        b = _linspace32(0.1, 1.0, items)
        means = (b[:-1] + b[1:]) / np.float32(2.0)
        scale = 10.0 ** (-(max_exp - 1) + i)
        data += (np.float32(scale) * means).astype(np.float32).tolist()
        data += (np.float32(-scale) * means).astype(np.float32).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return np.array(sorted(data), np.float32)


def _bounds(code: np.ndarray) -> np.ndarray:
    return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)


def _nearest(scaled, code: np.ndarray):
    """Index of the nearest code, ties to the lower (``torch.bucketize(x, midpoints)``)."""
    return jnp.searchsorted(jnp.asarray(_bounds(code)), scaled, side="left").astype(jnp.uint8)


def _blockwise(flat, block: int, code: np.ndarray):
    """bitsandbytes' blockwise absmax quantization of a flat float32 array (a shorter last
    block allowed): ``(codes uint8, absmax float32)``."""
    n = flat.shape[0]
    nb = -(-n // block)
    pad = nb * block - n
    x = jnp.pad(flat, (0, pad)).reshape(nb, block)
    absmax = jnp.max(jnp.abs(x), axis=1)
    recip = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    scaled = jnp.clip(x * recip[:, None], -1.0, 1.0).reshape(-1)[:n]
    return _nearest(scaled, code), absmax


@functools.partial(jax.jit, static_argnames=("block", "double"))
def _nf4_encode(w, block: int, double: bool) -> dict[str, jax.Array]:
    flat = w.reshape(-1).astype(jnp.float32)
    q, absmax = _blockwise(flat, block, NF4_CODE)
    packed = (q[0::2] << 4) | q[1::2]
    lead = w.shape[:-1] if w.shape[-1] % block == 0 else None
    shape_p = (*lead, w.shape[-1] // 2) if lead is not None else (-1,)
    shape_a = (*lead, w.shape[-1] // block) if lead is not None else (-1,)
    out = {"packed": packed.reshape(shape_p)}
    if not double:
        out["absmax"] = absmax.reshape(shape_a)
        return out
    offset = jnp.mean(absmax)
    qa, absmax2 = _blockwise(absmax - offset, _DQ_BLOCK, dynamic_map())
    out.update(qabsmax=qa.reshape(shape_a), absmax2=absmax2, offset=offset)
    return out


def _nf4_absmax(arrays) -> jax.Array:
    if "absmax" in arrays:
        return arrays["absmax"].reshape(-1)
    qa = arrays["qabsmax"].reshape(-1)
    n = qa.shape[0]
    nb = arrays["absmax2"].shape[0]
    vals = jnp.asarray(dynamic_map())[qa.astype(jnp.int32)]
    vals = jnp.pad(vals, (0, nb * _DQ_BLOCK - n)).reshape(nb, _DQ_BLOCK)
    return (vals * arrays["absmax2"][:, None]).reshape(-1)[:n] + arrays["offset"]


def _nf4_decode(arrays, shape, dtype, block: int):
    p = arrays["packed"].reshape(-1)
    q = jnp.stack([p >> 4, p & 0xF], axis=-1).reshape(-1).astype(jnp.int32)
    vals = jnp.asarray(NF4_CODE)[q].reshape(-1, block)
    return (vals * _nf4_absmax(arrays)[:, None]).reshape(shape).astype(dtype)


@jax.jit
def _int8_encode(w) -> dict[str, jax.Array]:
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=-2, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return {"q": q, "scale": scale}


def _int8_decode(arrays, dtype):
    return (arrays["q"].astype(jnp.float32) * arrays["scale"]).astype(dtype)


_HINT = (
    "this weight is quantized (a `pj.Quantized` node), so it is not an array: run the model "
    "through `pj.apply` (it dequantizes inside the step), or call `pj.dequantize(params)` / "
    "`node.dense()`."
)


@register_pytree_with_keys_class
class Quantized:
    """A frozen weight stored quantized. Immutable; a pytree whose children are the stored
    arrays (``.arrays[name]``) and whose aux data is the logical ``shape``, ``dtype``,
    ``scheme``, ``block_size`` and ``double_quant`` (static).

    Arrays: NF4 ``packed`` (uint8, two codes a byte) and either ``absmax`` (float32) or, with
    double quantization, ``qabsmax`` (uint8), ``absmax2`` (float32, one per 256 absmax) and
    ``offset`` (float32 scalar); int8 ``q`` (int8, the weight's shape) and ``scale`` (float32).
    Build one with `quantize` or `quantize_array`; `dense` gives the float weight back.

    Attributes:
      arrays: the stored arrays by name (above); the node's only pytree children.
      shape: the logical (dequantized) weight's shape.
      dtype: the weight's dtype before quantization (`dense`'s default).
      scheme: ``"nf4"`` or ``"int8"``.
      block_size: NF4's block size (bitsandbytes' ``blocksize``); kept but unused by int8.
      double_quant: NF4: whether the absmax is itself quantized (QLoRA's double quantization).

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.quantize({"d": {"kernel": jnp.ones((64, 8))}}, double_quant=False)
      >>> q = p["d"]["kernel"]
      >>> q.shape, q.scheme, sorted(q.arrays), q.dense().dtype
      ((64, 8), 'nf4', ['absmax', 'packed'], dtype('float32'))
    """

    __slots__ = ("arrays", "shape", "dtype", "scheme", "block_size", "double_quant")
    arrays: dict[str, Any]
    shape: tuple[int, ...]
    dtype: Any
    scheme: str
    block_size: int
    double_quant: bool

    def __init__(self, arrays, shape, dtype, scheme, block_size, double_quant):
        object.__setattr__(self, "arrays", dict(arrays))
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "dtype", jnp.dtype(dtype))
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "block_size", int(block_size))
        object.__setattr__(self, "double_quant", bool(double_quant))

    def __setattr__(self, name, value):
        raise AttributeError("Quantized nodes are immutable; use `pj.quantize` / `pj.dequantize`.")

    def _aux(self):
        return (self.shape, self.dtype, self.scheme, self.block_size, self.double_quant)

    def tree_flatten_with_keys(self):
        return ((GetAttrKey("arrays"), self.arrays),), self._aux()

    def tree_flatten(self):
        return (self.arrays,), self._aux()

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        return sum(
            int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize for v in self.arrays.values()
        )

    def dense(self, dtype=None) -> jax.Array:
        """The dequantized weight (traceable).

        Args:
          dtype: the result's dtype; default the dtype the weight had when quantized.

        Returns:
          An array of ``self.shape``.
        """
        dtype = self.dtype if dtype is None else jnp.dtype(dtype)
        if self.scheme == "nf4":
            return _nf4_decode(self.arrays, self.shape, dtype, self.block_size)
        return _int8_decode(self.arrays, dtype)

    def __jax_array__(self):
        raise TypeError(_HINT)

    def __array__(self, *args, **kwargs):
        raise TypeError(_HINT)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.scheme == "nf4" and self.double_quant else ""
        return (
            f"Quantized({self.scheme}, {self.dtype}{list(self.shape)}, "
            f"block_size={self.block_size}{dq})"
        )


def is_quantized(x) -> bool:
    """Whether ``x`` is a `Quantized` node.

    Args:
      x: any value (a leaf of a params tree, an array, an ``Adapted`` leaf...). An adapted
        weight whose base is quantized is not itself a `Quantized` node.

    Returns:
      ``True`` for a `Quantized` node, ``False`` for anything else.

    Raises:
      Nothing: any value is accepted.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.quantize({"fc": {"kernel": jnp.ones((64, 8))}, "norm": {"scale": jnp.ones(8)}})
      >>> pj.is_quantized(p["fc"]["kernel"]), pj.is_quantized(p["norm"]["scale"])
      (True, False)
    """
    return isinstance(x, Quantized)


def _check_options(scheme, block_size, double_quant) -> None:
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ConfigError(f"`scheme`: expected one of {list(SCHEMES)}, got {scheme!r}.")
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, (int, np.integer)):
        raise ConfigError(f"`block_size`: expected an int, got {block_size!r}.")
    if block_size < 2 or block_size % 2:
        raise ConfigError(
            f"`block_size`: expected a positive even int (bitsandbytes uses 32, 64, ..., 4096), "
            f"got {block_size}."
        )
    if not isinstance(double_quant, (bool, np.bool_)):
        raise ConfigError(f"`double_quant`: expected a bool, got {double_quant!r}.")


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def quantize_array(w, *, scheme="nf4", block_size=64, double_quant=True, where="<array>"):
    """One float array as a `Quantized` node.

    Args:
      w: a float array with 2 or more dims.
      scheme: ``"nf4"`` or ``"int8"``.
      block_size: NF4's block (it must divide ``w.size``); ignored by int8.
      double_quant: NF4: quantize the absmax as well (bitsandbytes' ``compress_statistics``).
      where: the array's path, for error messages.

    Returns:
      A `Quantized` node.

    Raises:
      ConfigError: an unknown scheme or an invalid block size.
      ArgumentTypeError: ``w`` is not a float array with 2 or more dims.
      ShapeError: ``block_size`` does not divide ``w.size``.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> pj.quantize_array(jnp.ones((4, 16)), scheme="int8").arrays["q"].dtype
      dtype('int8')
    """
    _check_options(scheme, block_size, double_quant)
    if isinstance(w, Quantized):
        raise ArgumentTypeError(f"`{where}` is already quantized ({w!r}).")
    if not _is_float(w) or len(getattr(w, "shape", ())) < 2:
        what = f"{w.dtype}{list(w.shape)}" if hasattr(w, "shape") else type(w).__name__
        raise ArgumentTypeError(
            f"`{where}`: only float weight matrices (2 or more dims) can be quantized, got {what}."
        )
    size = math.prod(w.shape)
    if scheme == "nf4":
        if size % block_size:
            raise ShapeError(
                f"`{where}`: block_size={block_size} does not divide the weight's {size} values "
                f"(shape {list(w.shape)}); pick a block size that does (e.g. 32 or 16)."
            )
        arrays = _nf4_encode(jnp.asarray(w), block_size, bool(double_quant))
    else:
        arrays = _int8_encode(jnp.asarray(w))
    return Quantized(arrays, w.shape, w.dtype, scheme, block_size, bool(double_quant))


def _targets_arg(targets) -> Any:
    if targets is None or isinstance(targets, str):
        return targets
    if isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets):
        return tuple(targets)
    raise ConfigError(
        "`targets`: expected None, a regex (str, full match) or a list of module names / "
        f"dotted suffixes (LoRA's `target_modules` rule), got {targets!r}."
    )


def quantize(params, *, scheme="nf4", block_size=64, double_quant=True, targets=None):
    """Quantize the frozen base weights of ``params`` (QLoRA).

    Args:
      params: a linen param dict, an nnx ``State``, any pytree; it may carry adapters (their
        base weights are quantized, their arrays kept).
      scheme: ``"nf4"`` (4-bit NormalFloat, bitsandbytes' format) or ``"int8"``.
      block_size: NF4's block (bitsandbytes' ``blocksize``, default 64).
      double_quant: NF4: also quantize the absmax to 8 bits (QLoRA's double quantization).
      targets: which modules: ``None`` (default) is every float ``kernel`` / ``weight`` leaf
        with 2 or more dims whose size ``block_size`` divides (embedding tables, norms and
        biases stay float); otherwise LoRA's ``target_modules`` rule (a regex full match or a
        list of names / dotted suffixes), each matched module's weight matrix quantized.

    Returns:
      A new tree with `Quantized` nodes in place of the chosen weights; ``params`` is left
      unchanged. Leaves already quantized are kept.

    Raises:
      ConfigError: an unknown scheme, an invalid block size or malformed ``targets``.
      TargetError: ``targets`` match no module.
      ArgumentTypeError: a matched module has no float weight matrix.
      ShapeError: ``block_size`` does not divide a matched weight's size.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = {"q_proj": {"kernel": jnp.ones((64, 64))}, "norm": {"scale": jnp.ones(64)}}
      >>> pj.quantize(p)["q_proj"]["kernel"]
      Quantized(nf4, float32[64, 64], block_size=64, double_quant)
    """
    from . import paths as P
    from ._tree import group_modules, rebuild, walk, weight_leaf
    from .node import is_adapted

    _check_options(scheme, block_size, double_quant)
    targets = _targets_arg(targets)
    leaves, treedef = walk(params)
    opts = dict(scheme=scheme, block_size=int(block_size), double_quant=bool(double_quant))
    chosen = []
    if targets is None:
        for l in leaves:
            b = l.base
            if (
                l.name in ("kernel", "weight")
                and not isinstance(b, Quantized)
                and _is_float(b)
                and len(b.shape) >= 2
                and (scheme != "nf4" or math.prod(b.shape) % block_size == 0)
            ):
                chosen.append(l)
    else:
        groups = group_modules(leaves)
        mods = [m for m in groups if m and P.matches_target(m, targets)]
        if not mods:
            raise TargetError(
                f"`targets={targets!r}` match no module; modules here include "
                f"{[m for m in groups if m][:8]}."
            )
        for m in mods:
            w = weight_leaf(groups[m])
            if w is None:
                raise ArgumentTypeError(
                    f"`targets`: module `{m}` has no weight matrix to quantize (its leaves: "
                    f"{[l.name for l in groups[m]]})."
                )
            if not isinstance(w.base, Quantized):
                chosen.append(w)
    out = [l.value for l in leaves]
    for l in chosen:
        q = quantize_array(l.base, where=".".join(l.names), **opts)
        out[l.index] = l.value.replace(base=q) if is_adapted(l.value) else q
    leaves = [type(l)(l.index, l.names, l.name, l.module, v) for l, v in zip(leaves, out)]
    return rebuild(treedef, leaves)


def as_float(x):
    """``x`` dequantized if it is a `Quantized` weight, else ``x`` itself."""
    return x.dense() if isinstance(x, Quantized) else x


def _dense_value(x):
    from .node import is_adapted

    if isinstance(x, Quantized):
        return x.dense()
    if is_adapted(x) and isinstance(x.base, Quantized):
        return x.replace(base=x.base.dense())
    return x


def dequantize(params):
    """Every `Quantized` weight of ``params`` (adapted bases too) as a float array of its
    original dtype.

    Args:
      params: any tree, maybe with `Quantized` leaves and adapters.

    Returns:
      A new tree without `Quantized` nodes; ``params`` is left unchanged.

    Raises:
      Nothing: any pytree is accepted (a tree without `Quantized` nodes comes back as it is).

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.quantize({"d": {"kernel": jnp.ones((64, 8))}}, scheme="int8")
      >>> w = pj.dequantize(p)["d"]["kernel"]
      >>> pj.is_quantized(w), w.dtype, float(w[0, 0])
      (False, dtype('float32'), 1.0)
    """
    from ._tree import rebuild, walk

    leaves, treedef = walk(params)
    for l in leaves:
        l.value = _dense_value(l.value)
    return rebuild(treedef, leaves)
