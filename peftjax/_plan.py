"""Planning an injection: which modules a config adapts, how each weight is read, which layer
slices of a stacked weight are on. No arrays are made here (`transforms.inject` builds them).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from . import paths as P
from ._peft_keys import torch_name
from ._tree import Leaf, dotted, weight_leaf
from .config import AdapterConfig
from .errors import ConfigError, TargetError, UnsupportedModuleError
from .layout import Layout, LayoutSpec, copy_stack, resolve_layout
from .methods import method_of

__all__ = [
    "Planned",
    "layer_mask",
    "linear_ndim",
    "matches_parameter",
    "parameter_path",
    "plan_injection",
    "plan_parameters",
]


@dataclasses.dataclass
class Planned:
    """One module to adapt: its path, the leaves it changes and how its weight is read.

    ``weight``: the adapted weight leaf (``None`` for a method that copies whole modules, whose
    leaves are ``leaves``; ``layout`` then only gives their stacked layer axes). ``mask``:
    per-layer on/off of a stacked weight with ``layers_to_transform`` (``None``: every layer)."""

    module: str
    leaves: list[Leaf]
    weight: Leaf | None = None
    layout: Layout | None = None
    mask: list[bool] | None = None
    #: a parameter targeted by ``target_parameters``: its PEFT parameter path, and how many
    #: other targeted parameters of its PEFT module are wrapped around it (`plan_parameters`)
    param: str | None = None
    nest: int = 0
    #: the config the specs are made from when the method's planner resolved fields from the
    #: tree (`AdapterConfig.plan_targets`: prefix tuning reads its layer count and KV width)
    config: AdapterConfig | None = None


def layer_mask(config: AdapterConfig, layout: Layout | None, shape) -> list[bool] | None:
    """Per-layer on/off for stacked weights with ``layers_to_transform``."""
    ltt = getattr(config, "layers_to_transform", None)
    if ltt is None or layout is None or not layout.stack:
        return None
    n = int(np.prod(layout.stack_shape(shape)))
    wanted = {ltt} if isinstance(ltt, int) else set(ltt)
    return [i in wanted for i in range(n)]


def linear_ndim(layouts: LayoutSpec, mod: str, w: Leaf) -> int:
    """A weight's ndim as ``"all-linear"`` sees it: 2 for a kernel that ``layouts`` reads as one
    dense matrix per layer (stacked or DenseGeneral kernels are Linear layers), else its own."""
    if layouts:
        try:
            if resolve_layout(layouts, mod, w.name, w.base).kind == "dense":
                return 2
        except UnsupportedModuleError:
            pass
    return w.base.ndim


def _select(config: AdapterConfig, groups: dict[str, list[Leaf]], layouts, save_paths) -> list[str]:
    """The module paths ``config`` targets (PEFT's rules), before the layer filter."""
    method = method_of(config)
    if method.whole_modules:
        candidates = [m for m in groups if m]
    else:
        candidates = [m for m, g in groups.items() if weight_leaf(g) is not None]
    linear = None
    if P.is_all_linear(config.target_modules):
        items = [
            (m, w.name, linear_ndim(layouts, m, w))
            for m in candidates
            if (w := weight_leaf(groups[m]))
        ]
        linear = P.select_all_linear(items, task_type=getattr(config, "task_type", None))
    return P.select_modules(
        candidates,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
        modules_to_save=save_paths,
        linear_modules=linear,
        forbid_with_str_target=False,
    )


def parameter_path(l: Leaf) -> str:
    """The PEFT parameter path of a leaf (``target_parameters`` match these): its parent's
    dotted path and its torch name, e.g. ``mlp.experts.gate_up_proj`` or, for a ``kernel``
    leaf of module ``mlp.experts``, ``mlp.experts.weight``."""
    parent = dotted(l.names[:-1])
    return f"{parent}.{torch_name(l.name)}" if parent else torch_name(l.name)


def matches_parameter(key: str, targets) -> bool:
    """PEFT's ``target_parameters`` rule: ``key`` is a listed name or ends in ``.<name>``."""
    return any(key == t or key.endswith("." + t) for t in targets or ())


def plan_parameters(
    config: AdapterConfig, groups: dict[str, list[Leaf]], layouts: LayoutSpec, taken=()
) -> list[Planned]:
    """The parameters ``config.target_parameters`` targets (PEFT's ``_inject_parameters``),
    in tree order. A 2-D weight is read as dense ``(in, out)``, a 3-D one as ``(experts, in,
    out)`` (``Layout("dense", stack=1)``; ``layouts`` may say ``transposed=True``). Several
    targeted parameters of one PEFT module are nested as PEFT nests its ``ParamWrapper``s: the
    one matched by the earliest ``target_parameters`` entry is wrapped first (innermost, the
    most ``.base_layer`` in its keys). PEFT wraps in the torch module's parameter order, so list
    them in that order (HF MoE experts: ``gate_up_proj`` before ``down_proj``). ``taken``: leaf
    indices already adapted through ``target_modules`` (an error, as in PEFT)."""
    targets = getattr(config, "target_parameters", None) or ()
    by_parent: dict[str, list[tuple[int, Leaf, str]]] = {}
    for group in groups.values():
        for l in group:
            key = parameter_path(l)
            hits = [i for i, t in enumerate(targets) if key == t or key.endswith("." + t)]
            if not hits:
                continue
            parent = key.rpartition(".")[0]
            if not parent:
                raise UnsupportedModuleError(
                    f"`target_parameters`: parameter `{key}` is at the top level of the tree; "
                    "PEFT cannot target a parameter of the top-level module."
                )
            if l.index in taken:
                raise TargetError(
                    f"`target_parameters`: parameter `{key}` (module `{l.module}`) is also "
                    "targeted by `target_modules`; a weight is adapted one way or the other."
                )
            by_parent.setdefault(parent, []).append((hits[0], l, key))
    plan = []
    for items in by_parent.values():
        items.sort(key=lambda t: (t[0], t[1].index))
        for j, (_, l, key) in enumerate(items):
            lay = _param_layout(layouts, l, key)
            plan.append(Planned(l.module, [l], l, lay, None, key, len(items) - 1 - j))
    plan.sort(key=lambda p: p.leaves[0].index)  # its weight: the one leaf
    return plan


def _param_layout(layouts: LayoutSpec, l: Leaf, key: str) -> Layout:
    shape = tuple(l.base.shape)
    if len(shape) not in (2, 3):
        raise UnsupportedModuleError(
            f"`target_parameters`: parameter `{key}` has shape {shape}; PEFT adapts 2-D "
            "`(in, out)` and 3-D `(experts, in, out)` parameters only."
        )
    stack = len(shape) - 2
    lay = Layout("dense", stack=stack)
    if layouts:
        try:
            lay = resolve_layout(layouts, l.module, l.name, l.base)
        except UnsupportedModuleError:
            lay = Layout("dense", stack=stack)
        if lay.kind != "dense" or lay.stack != stack or lay.n_in != 1:
            raise UnsupportedModuleError(
                f"`target_parameters`: parameter `{key}` of shape {shape} must be read as "
                f"`pj.Layout('dense', stack={stack})` (optionally `transposed=True`), not {lay}."
            )
    return lay


def plan_injection(
    config: AdapterConfig, groups: dict[str, list[Leaf]], layouts: LayoutSpec, save_paths
) -> list[Planned]:
    """The modules `inject` adapts, in tree order, then the parameters PEFT's
    ``target_parameters`` names (`plan_parameters`); every error names the module or field."""
    own = config.plan_targets(groups, layouts)
    if own is not None:  # a method that picks its own leaves (prompt learning)
        return own
    tparams = getattr(config, "target_parameters", None)
    if config.target_modules is None and not tparams:
        raise ConfigError(
            "`target_modules=None`: peftjax has no per-architecture default; name the modules, "
            "e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'."
        )
    if not tparams:
        plan = _plan_modules(config, groups, layouts, save_paths)
    elif not config.target_modules:
        plan = []  # PEFT's `target_modules=[]` (or None) with `target_parameters`
    else:
        try:
            plan = _plan_modules(config, groups, layouts, save_paths)
        except TargetError:
            plan = []  # PEFT only warns when parameters are matched (below)
    if tparams:
        taken = {p.weight.index for p in plan if p.weight is not None}
        params = plan_parameters(config, groups, layouts, taken)
        if not params:
            raise TargetError(
                f"`target_parameters={list(tparams)}` matched no parameter (a parameter path is "
                "its module's path and its name, e.g. `mlp.experts.gate_up_proj`; an entry "
                "matches it whole or as a `.`-suffix)."
            )
        if config.target_modules and not plan:
            warnings.warn(
                f"target_modules={config.target_modules!r} were set but no module was matched.",
                RuntimeWarning,
                stacklevel=3,
            )
        plan = plan + params
    # PEFT matches rank / alpha patterns on parameter paths for `target_parameters`
    targeted = [p.param or p.module for p in plan]
    for field in config.PATTERN_FIELDS:
        pattern: Any = getattr(config, field, None)
        if pattern:
            P.check_pattern_keys(targeted, pattern, field)
    return plan


def _plan_modules(
    config: AdapterConfig, groups: dict[str, list[Leaf]], layouts: LayoutSpec, save_paths
) -> list[Planned]:
    """The modules ``target_modules`` (and the layer options) select."""
    method = method_of(config)
    plan = []
    for mod in _select(config, groups, layouts, save_paths):
        if method.whole_modules:
            # A copy is taken whole (no per-layer filter); of `layouts` (which describe matrix
            # views, and need not fit a 1-D norm) only the stack axes apply: a scanned model's
            # norms are stacked like its kernels, one PEFT module per layer in the files.
            stack = max(copy_stack(layouts, mod, l.base) for l in groups[mod])
            plan.append(Planned(mod, groups[mod], layout=Layout("dense", stack=stack)))
            continue
        w = weight_leaf(groups[mod])
        if w is None:  # `_select` picks modules with a weight; a norm or bias alone has none
            raise UnsupportedModuleError(f"module `{mod}` has no weight array to adapt.")
        lay = resolve_layout(layouts, mod, w.name, w.base)
        if lay.kind not in method.adapts:
            raise UnsupportedModuleError(
                f"module `{mod}`: {method.name} cannot adapt a {lay.kind} weight (shape "
                f"{tuple(w.base.shape)}); it adapts {', '.join(method.adapts)} weights."
            )
        plan.append(Planned(mod, [w], w, lay, layer_mask(config, lay, w.base.shape)))
    ltt = getattr(config, "layers_to_transform", None)
    if ltt is not None and not isinstance(config.target_modules, str):
        lpat = getattr(config, "layers_pattern", None)
        # PEFT's layer filter (list targets only); stacked weights are filtered per layer slice
        # (a stacked weight with no selected layer slice is not adapted).
        before = [p.module for p in plan]
        plan = [
            p
            for p in plan
            if (p.mask is not None and any(p.mask))
            or P.matches_target(
                p.module, config.target_modules, layers_to_transform=ltt, layers_pattern=lpat
            )
        ]
        if not plan:
            raise TargetError(
                f"`layers_to_transform={ltt!r}`"
                + (f" with `layers_pattern={lpat!r}`" if lpat else "")
                + f" left no module among the targeted ones: {before[:5]}."
            )
    return plan
