"""Planning an injection: which modules a config adapts, how each weight is read, which layer
slices of a stacked weight are on. No arrays are made here (`transforms.inject` builds them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import paths as P
from ._tree import Leaf, weight_leaf
from .config import AdapterConfig
from .errors import ConfigError, TargetError, UnsupportedModuleError
from .layout import Layout, LayoutSpec, resolve_layout
from .methods import method_of

__all__ = ["Planned", "layer_mask", "linear_ndim", "plan_injection"]


@dataclasses.dataclass
class Planned:
    """One module to adapt: its path, the leaves it changes and how its weight is read.

    ``weight``: the adapted weight leaf (``None`` for a method that copies whole modules, whose
    leaves are ``leaves``); ``layout`` is ``None`` then. ``mask``: per-layer on/off of a stacked
    weight with ``layers_to_transform`` (``None``: every layer)."""

    module: str
    leaves: list[Leaf]
    weight: Leaf | None = None
    layout: Layout | None = None
    mask: list[bool] | None = None


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


def plan_injection(
    config: AdapterConfig, groups: dict[str, list[Leaf]], layouts: LayoutSpec, save_paths
) -> list[Planned]:
    """The modules `inject` adapts, in tree order; every error names the module or field."""
    if config.target_modules is None:
        raise ConfigError(
            "`target_modules=None`: peftjax has no per-architecture default; name the modules, "
            "e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'."
        )
    method = method_of(config)
    plan = []
    for mod in _select(config, groups, layouts, save_paths):
        if method.whole_modules:
            # A copy is taken whole (no per-layer filter), so `layouts` (which describe matrix
            # views, and need not fit a 1-D or stacked norm) do not apply.
            plan.append(Planned(mod, groups[mod]))
            continue
        w = weight_leaf(groups[mod])
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
    targeted = [p.module for p in plan]
    for field in config.PATTERN_FIELDS:
        pattern: Any = getattr(config, field, None)
        if pattern:
            P.check_pattern_keys(targeted, pattern, field)
    return plan
