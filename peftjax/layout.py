"""How a weight array is read as a matrix: dense, conv or embedding, with stacked layer axes.

Every method works on a *matrix view* of a weight, in Flax orientation ``(in, out)``:

* ``dense``: shape ``(*stack, *in_axes, *out_axes)`` with ``n_in`` input axes. The view is
  ``W.reshape(*stack, prod(in_axes), prod(out_axes))``, i.e. row-major flattening. This is how a
  Flax ``DenseGeneral``/``Einsum`` kernel such as ``(embed, heads, head_dim)`` corresponds to a
  torch ``Linear(embed, heads * head_dim)`` (HF's Flax<->torch converters reshape this way), so
  adapters stay PEFT-compatible.
* ``conv``: shape ``(*stack, *spatial, in, out)`` (Flax ``Conv``). The view is
  ``(in * prod(spatial), out)`` with index order ``(in, *spatial)``, the transpose of PEFT's
  ``weight.flatten(1)`` of a torch ``(out, in, *spatial)`` weight.
* ``embed``: shape ``(*stack, vocab, features)`` (Flax ``Embed``); the view is the table itself.
* ``dense`` with ``transposed=True``: shape ``(*stack, *out_axes, *in_axes)``, input axes last
  (e.g. transformers' Flax GPT-2 kernels, stored ``(out, in)``); the view is the transpose.

``stack`` counts leading axes of stacked (scanned) layers, ``(L, in, out)`` for ``nn.scan``;
each layer gets its own adapter slice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from .errors import UnsupportedModuleError

KINDS = ("dense", "conv", "embed")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How to read one weight array.

    Args:
      kind: ``"dense"``, ``"conv"`` or ``"embed"``.
      stack: number of leading stacked-layer axes (``1`` for ``nn.scan`` / ``nnx.scan`` trees).
      n_in: for ``dense``, how many axes are input (contracted) axes: the first ``n_in`` after
        the stack axes, or the last ``n_in`` with ``transposed``.
      transposed: for ``dense``, the weight stores output axes before input axes.

    Pass one (or a dict ``{module regex or suffix: Layout}``, or a callable) as ``layouts=`` to
    `inject`, `load_pretrained` and the other functions that read weights.

    Raises:
      UnsupportedModuleError: an unknown ``kind``, ``transposed`` on a non-dense weight,
        ``stack < 0`` or ``n_in < 1``.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> pj.Layout(stack=1).in_out((2, 4, 3))  # 2 stacked layers of (in=4, out=3)
      (4, 3)
      >>> pj.Layout(transposed=True).in_out((3, 4))  # an (out, in) kernel
      (4, 3)
      >>> p = pj.inject({"layers": {"fc": {"kernel": jnp.ones((2, 4, 3))}}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0,
      ...               layouts=pj.Layout(stack=1))
      >>> p["layers"]["fc"]["kernel"].arrays["default"]["lora_A"].shape
      (2, 4, 2)
    """

    kind: str = "dense"
    stack: int = 0
    n_in: int = 1
    transposed: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UnsupportedModuleError(f"Layout `kind={self.kind!r}`: must be one of {KINDS}.")
        if self.transposed and self.kind != "dense":
            raise UnsupportedModuleError(
                f"Layout `transposed=True` is for dense weights, not {self.kind}."
            )
        if self.stack < 0 or self.n_in < 1:
            raise UnsupportedModuleError(
                f"Layout needs `stack >= 0` and `n_in >= 1`, got stack={self.stack}, "
                f"n_in={self.n_in}."
            )

    def check(self, shape: tuple[int, ...], path: str) -> None:
        nd = len(shape) - self.stack
        need = {"dense": self.n_in + 1, "conv": 3, "embed": 2}[self.kind]
        if nd < need or (self.kind == "embed" and nd != 2) or (self.kind == "conv" and nd > 5):
            raise UnsupportedModuleError(
                f"module `{path}`: a weight of shape {shape} cannot be read as {self}; "
                "pass `layouts=` to `inject` to say which axes are stacked layers and inputs."
            )

    # --- matrix view --------------------------------------------------------------------
    def layer_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[self.stack :])

    def stack_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[: self.stack])

    def in_out(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(in_features, out_features) of one layer's matrix view."""
        s = self.layer_shape(shape)
        if self.kind == "dense" and self.transposed:
            return math.prod(s[len(s) - self.n_in :]), math.prod(s[: len(s) - self.n_in])
        if self.kind == "dense":
            return math.prod(s[: self.n_in]), math.prod(s[self.n_in :])
        if self.kind == "conv":
            return math.prod(s[:-1]), s[-1]
        return s[0], s[1]

    def spatial(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.layer_shape(shape)[:-2]) if self.kind == "conv" else ()

    def to_matrix(self, w, shape: tuple[int, ...] | None = None):
        """One layer's weight (no stack axes) -> ``(in, out)`` matrix."""
        import jax.numpy as jnp

        if self.kind == "conv":
            nsp = w.ndim - 2
            perm = (nsp,) + tuple(range(nsp)) + (nsp + 1,)
            return jnp.transpose(w, perm).reshape(-1, w.shape[-1])
        if self.kind == "dense" and self.transposed:
            return w.reshape(-1, math.prod(w.shape[w.ndim - self.n_in :])).T
        if self.kind == "dense":
            return w.reshape(math.prod(w.shape[: self.n_in]), -1)
        return w

    def from_matrix(self, m, layer_shape: tuple[int, ...]):
        """Inverse of `to_matrix` for one layer."""
        import jax.numpy as jnp

        if self.kind == "conv":
            sp, cin, cout = layer_shape[:-2], layer_shape[-2], layer_shape[-1]
            t = m.reshape((cin, *sp, cout))
            nsp = len(sp)
            perm = tuple(range(1, nsp + 1)) + (0, nsp + 1)
            return jnp.transpose(t, perm)
        if self.kind == "dense" and self.transposed:
            return m.T.reshape(layer_shape)
        return m.reshape(layer_shape)


def infer_layout(path: str, leaf_name: str, shape: tuple[int, ...]) -> Layout | None:
    """The default layout of a weight leaf, or ``None`` when its shape is ambiguous.

    2-D leaves are dense (``embedding`` leaves are embeddings); 4-D ``kernel`` leaves are 2-D convs;
    3-D leaves are ambiguous (stacked dense, DenseGeneral or 1-D conv) and need ``layouts=``.
    """
    nd = len(shape)
    if leaf_name == "embedding":
        return Layout("embed", stack=nd - 2) if nd >= 2 else None
    if nd == 2:
        return Layout("dense")
    if nd == 4 and leaf_name == "kernel":
        return Layout("conv")
    return None


LayoutSpec = Mapping[str, Layout] | Callable[[str, Any], "Layout | None"] | Layout | None


def given_layout(layouts: LayoutSpec, path: str, leaf) -> Layout | None:
    """The layout ``layouts`` names for module ``path`` (one Layout, the first matching regex /
    path / suffix key, or the callable's answer), unchecked; ``None`` when it names none."""
    import re

    if isinstance(layouts, Layout):
        return layouts
    if callable(layouts):
        return layouts(path, leaf)
    for pat, cand in (layouts or {}).items():
        if re.fullmatch(pat, path) or path == pat or path.endswith("." + pat):
            return cand
    return None


def copy_stack(layouts: LayoutSpec, path: str, leaf) -> int:
    """Stacked layer axes of a whole-leaf copy (LN tuning) at module ``path``: those of the
    layout ``layouts`` names there (a scanned model's norms are stacked like its kernels), when
    the leaf has more axes than that; else ``0``."""
    lay = given_layout(layouts, path, leaf)
    st = lay.stack if isinstance(lay, Layout) else 0
    return st if len(getattr(leaf, "shape", ())) > st else 0


def resolve_layout(layouts: LayoutSpec, path: str, leaf_name: str, leaf) -> Layout:
    """Pick the layout of one weight: from `layouts` (regex -> Layout, callable, or one Layout)."""
    shape = tuple(leaf.shape)
    lay = given_layout(layouts, path, leaf)
    if lay is None:
        lay = infer_layout(path, leaf_name, shape)
    if lay is None:
        raise UnsupportedModuleError(_ambiguous_message(path, leaf_name, shape))
    lay.check(shape, path)
    return lay


def _ambiguous_message(path: str, leaf_name: str, shape: tuple[int, ...]) -> str:
    """The readings of a weight whose shape does not say its layout, each with what the
    shape's axes would then mean."""
    key = path.split(".")[-1] or path
    nd = len(shape)
    s = list(shape)
    lines = [
        f"module `{path}`: cannot tell how to read weight `{leaf_name}` of shape {tuple(shape)}; "
        f"pass `layouts={{'{key}': pj.Layout(...)}}` to `inject` with the reading that fits:"
    ]
    if nd >= 3:
        lines.append(
            f"  - stacked (scanned) layers: `pj.Layout('dense', stack=1)`: {s[0]} layers of "
            f"({', '.join(map(str, s[1:]))}) kernels, one adapter slice per layer"
        )
        lines.append(
            f"  - DenseGeneral input kernel (features, heads, head_dim), e.g. an attention "
            f"query/key/value: `pj.Layout('dense')` (n_in=1): {s[0]} inputs -> "
            f"{'x'.join(map(str, s[1:]))} outputs"
        )
        lines.append(
            f"  - DenseGeneral output kernel (heads, head_dim, features), e.g. an attention "
            f"output projection: `pj.Layout('dense', n_in=2)`: {'x'.join(map(str, s[:2]))} "
            f"inputs -> {'x'.join(map(str, s[2:]))} outputs"
        )
        if nd == 3:
            lines.append(
                f"  - 1-D conv (width, in, out): `pj.Layout('conv')`: width {s[0]}, {s[1]} in, "
                f"{s[2]} out channels"
            )
        lines.append("  - torch-style (out, in) kernels: add `transposed=True` to a dense reading")
    return "\n".join(lines)
