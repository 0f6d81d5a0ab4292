"""The adapted-weight pytree node: a base array plus named adapters, with static metadata.

``pj.inject`` replaces each targeted weight leaf by an `Adapted` node and leaves everything
else in the tree untouched. Children (traced, differentiated, sharded): ``base`` and
``arrays[name][param]``. Aux data (static, hashable, never a leaf): each adapter's `Spec`, the
active names, the merged names (in merge order), the frozen names (adapters loaded or
injected for inference: ``inference_mode=True``, see `pj.set_trainable`) and the ``disabled``
flag (`pj.disable_adapters`: the node acts as its base weight while its active set is kept; the
aux data carries the flag only when it is set, so other nodes flatten exactly as before).

Nodes share no mutable container with anything: `Adapted` copies its ``arrays`` dicts (the outer
dict and each adapter's) when it is built, so editing one tree's ``arrays`` never changes another
tree, and the pytree key paths stay ``.arrays[name][param]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
from jax.tree_util import GetAttrKey, register_pytree_with_keys_class

from .errors import AdaptedArrayError
from .quantize import Quantized

if TYPE_CHECKING:
    from .methods.base import Spec


def _fresh(arrays):
    """A copy of ``arrays`` (outer dict and each adapter's dict); other values are kept as given
    (``None`` in a `partition` half, bools in a mask, whatever a ``tree_map`` put there)."""
    if not isinstance(arrays, dict):
        return arrays
    return {n: (dict(a) if isinstance(a, dict) else a) for n, a in arrays.items()}


_ARRAY_HINT = (
    "this weight carries adapters (a `pj.Adapted` node), so it is not an array: run the model "
    "through `pj.apply`, e.g. `pj.apply(model.apply)(params, x)`, or fold the adapters in first "
    "with `pj.merge_and_unload(params)` (or drop them with `pj.unload(params)`)."
)


@register_pytree_with_keys_class
class Adapted:
    """A weight leaf carrying adapters. Immutable: every transform returns a new node.

    `pj.inject` builds these; use the transforms (`pj.merge`, `pj.set_active`, ...) rather than
    the constructor. Using one as a plain array outside `pj.apply` raises `AdaptedArrayError`.

    Attributes:
      base: the base weight (an array, or a `Quantized` node); a pytree child.
      arrays: ``{adapter name: {param: array}}`` (e.g. ``lora_A``, ``lora_B``); pytree
        children, the only trainable arrays.
      specs: ``((adapter name, Spec), ...)`` in injection order: each adapter's static
        description (method, rank, scaling, layout...); aux data.
      active: the active adapters' names, in activation order.
      merged: the names merged into ``base``, in merge order.
      frozen: the names that do not train (``inference_mode=True``, `pj.set_trainable`).
      disabled: ``True`` while `pj.disable_adapters` makes the node act as its base weight.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> w = p["fc"]["kernel"]
      >>> type(w).__name__, w.names, w.active, w.base.shape, sorted(w.arrays["default"])
      ('Adapted', ('default',), ('default',), (4, 3), ['lora_A', 'lora_B'])
      >>> w.spec("default").r
      2
    """

    __slots__ = ("base", "arrays", "specs", "active", "merged", "frozen", "disabled")
    base: Any
    arrays: dict[str, dict[str, Any]]
    specs: tuple[tuple[str, Spec], ...]
    active: tuple[str, ...]
    merged: tuple[str, ...]
    frozen: tuple[str, ...]
    disabled: bool

    def __init__(
        self,
        base: Any,
        arrays: dict[str, dict[str, Any]],
        specs: tuple[tuple[str, Spec], ...],
        active: tuple[str, ...] = (),
        merged: tuple[str, ...] = (),
        frozen: tuple[str, ...] = (),
        disabled: bool = False,
    ):
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "arrays", _fresh(arrays))
        object.__setattr__(self, "specs", specs)
        object.__setattr__(self, "active", active)
        object.__setattr__(self, "merged", merged)
        object.__setattr__(self, "frozen", frozen)
        object.__setattr__(self, "disabled", bool(disabled))

    def __setattr__(self, name, value):
        raise AttributeError("Adapted nodes are immutable; use the peftjax transforms.")

    # ---- pytree -----------------------------------------------------------------------------
    def _aux(self):
        aux = (self.specs, self.active, self.merged, self.frozen)
        return aux + (True,) if self.disabled else aux

    def tree_flatten_with_keys(self):
        children = ((GetAttrKey("base"), self.base), (GetAttrKey("arrays"), self.arrays))
        return children, self._aux()

    def tree_flatten(self):
        return (self.base, self.arrays), self._aux()

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], children[1], *aux)

    # ---- queries ------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.specs)

    def spec(self, name: str) -> Spec:
        for n, s in self.specs:
            if n == name:
                return s
        raise KeyError(name)

    # ---- not an array: say how to use it -------------------------------------------------
    def __jax_array__(self):
        raise AdaptedArrayError(_ARRAY_HINT)

    def __array__(self, *args, **kwargs):
        raise AdaptedArrayError(_ARRAY_HINT)

    def __float__(self):
        raise AdaptedArrayError(_ARRAY_HINT)

    def pending(self) -> list[tuple[str, Spec, dict]]:
        """Active, unmerged adapters on this leaf, in activation order (none while
        ``disabled``)."""
        if self.disabled:
            return []
        have = dict(self.specs)
        return [
            (n, have[n], self.arrays[n]) for n in self.active if n in have and n not in self.merged
        ]

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self):
        return len(self.base.shape)

    def replace(self, **kw) -> Adapted:
        fields = {k: getattr(self, k) for k in self.__slots__}
        fields.update(kw)
        return Adapted(**fields)

    def __repr__(self) -> str:
        shape = getattr(self.base, "shape", None)
        dtype = getattr(self.base, "dtype", None)
        ads = ", ".join(f"{n}={s.describe()}" for n, s in self.specs)
        return (
            f"Adapted(base={dtype}{list(shape) if shape is not None else ''}, {ads}, "
            f"active={self.active}, merged={self.merged}"
            + (f", frozen={self.frozen}" if self.frozen else "")
            + (", disabled)" if self.disabled else ")")
        )


def is_adapted(x) -> bool:
    return isinstance(x, Adapted)


def is_weight_node(x) -> bool:
    """`Adapted` or `Quantized` (`peftjax.quantize`): a node that stands for one weight."""
    return isinstance(x, (Adapted, Quantized))


def leaves_with_paths(tree):
    """``[(key path, leaf)]`` and the treedef, with `Adapted` and `Quantized` nodes as leaves."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_weight_node)
