"""Adapters made from other adapters, and adapters placed from a PEFT state dict's keys.

* `inject_from_state_dict`: PEFT's ``inject_adapter_in_model(config, model, state_dict=...)``
  (``BaseTuner.inject_adapter(state_dict=...)``): when an adapter's targets are unknown (a
  checkpoint without its config's targets), the modules to adapt are read from the state
  dict's keys instead of ``target_modules``.
* `supports_lora_conversion`, `convert_to_lora`, `save_as_lora`: PEFT 0.19+'s conversion of an
  additive adapter (LoHa, LoKr, LoRA... each spec says so: `Spec.supports_lora_conversion`)
  into a LoRA of a given rank by a truncated SVD of each module's delta
  (``peft/tuners/lora/conversion.py``).

Everything here is pure: the input trees are never modified; bad input raises a
`peftjax.errors.PeftJaxError` naming the key, module or argument.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import paths as P
from ._peft_keys import PREFIX, KeyMap, stacked_key_map
from ._plan import plan_injection
from ._tree import group_modules, rebuild, walk, weight_leaf
from .config import AdapterConfig, FrozenDict
from .errors import (
    ArgumentTypeError,
    ConfigError,
    MergeError,
    PeftJaxError,
    ShapeError,
    TargetError,
    UnsupportedModuleError,
)
from .io import exact_pattern, file_key, narrowed, reverse_map, save_pretrained
from .layout import LayoutSpec, resolve_layout
from .methods import COPY, DELTA, METHODS, Spec, method_named, method_of
from .node import is_adapted
from .sharding import place
from .transforms import adapter_names, check_names, inject, with_shared

__all__ = [
    "convert_to_lora",
    "inject_from_state_dict",
    "save_as_lora",
    "supports_lora_conversion",
]

#: The method `convert_to_lora` produces (PEFT's conversion target). The only method this
#: module names: the product of the conversion, never a source (sources answer
#: `Spec.supports_lora_conversion`).
_TARGET = "lora"


# ------------------------------------------------------------------------ from a state dict


def inject_from_state_dict(
    params,
    config: AdapterConfig,
    state_dict: Mapping[str, Any],
    *,
    key,
    name: str = "default",
    layouts: LayoutSpec = None,
    key_map: KeyMap | None = None,
    ranks: str = "config",
    strict: bool = True,
    dtype=jnp.float32,
    activate: bool | None = None,
    trainable: bool | None = None,
):
    """Inject adapter ``name`` at the modules whose keys ``state_dict`` holds, as PEFT's
    ``inject_adapter_in_model(config, model, state_dict=state_dict)``.

    The targets are the modules named by the state dict's adapter keys (the method's key
    suffixes, e.g. ``fc1.lora_A.weight``), not ``config.target_modules``; like PEFT,
    ``target_modules``, ``exclude_modules`` and ``layers_to_transform`` are then not used, and a
    ``RuntimeWarning`` (PEFT's text) says when the config would have targeted other modules.
    ``modules_to_save``, ``rank_pattern`` / ``alpha_pattern`` and the method's other fields
    apply as in `inject`. As in PEFT, only the keys are used: the adapter is initialised as
    `inject` does (load the values with `load_pretrained` from a directory).

    Args:
      params: the base tree (never modified), as for `inject`.
      config: the adapter's config (any registered method; PEFT refuses ``target_parameters``
        here, and so does peftjax).
      state_dict: ``{key: tensor}`` in PEFT's checkpoint form (``base_model.model.fc1.lora_A.
        weight``, the prefix optional) or the model's own (``fc1.lora_A.default.weight``, with
        the adapter name ``name``); a leading ``_orig_mod.`` (``torch.compile``) is dropped.
        Values need a ``.shape`` for the shape checks and for ``ranks="state_dict"``.
      key: a JAX PRNG key (or int seed) for the initial arrays, as `inject`.
      name: the new adapter's name, as `inject`; also the adapter name in model-form keys.
      layouts: as `inject` (stacked and DenseGeneral weights).
      key_map: ``(module_path[, layer]) -> PEFT module path`` as `load_pretrained`; stacked
        (scanned) weights take the layers the state dict has (the others carry no adapter).
      ranks: ``"config"`` (PEFT's rule: ``r`` / ``rank_pattern`` of the config; a tensor whose
        shape disagrees is a `ShapeError` naming the key and the rank it implies) or
        ``"state_dict"``: each module's rank is read from its tensors' shapes (the rank that
        makes every one of them fit, the config's where it does), alpha still the config's.
      strict: refuse keys that match no module of ``params`` and adapter keys the config does
        not use (``False``: ignore them, as PEFT does).
      dtype: dtype of the adapter arrays, as `inject`.
      activate: as `inject` (default: active when it is the first adapter).
      trainable: as `inject`.

    Returns:
      A new tree with adapter ``name`` injected at the state dict's modules (initialised, not
      loaded); ``params`` is left unchanged.

    Raises:
      ConfigError: ``config`` is not a peftjax config; ``target_parameters`` set;
        ``state_dict`` keys of another method.
      ArgumentTypeError: ``state_dict`` is not a mapping or has non-str keys; an unknown
        ``ranks``; ``name`` is not a non-empty str.
      TargetError: no adapter key, or (``strict``) keys that match no module.
      ShapeError: a tensor that does not fit its module.

    Example:

      >>> import numpy as np, jax.numpy as jnp, peftjax as pj
      >>> sd = {"base_model.model.fc.lora_A.weight": np.zeros((2, 4)),
      ...       "base_model.model.fc.lora_B.weight": np.zeros((6, 2))}
      >>> p = pj.inject_from_state_dict({"fc": {"kernel": jnp.ones((4, 6))}},
      ...                               pj.LoraConfig(r=8, target_modules=["fc"]), sd,
      ...                               key=0, ranks="state_dict")
      >>> pj.targeted_modules(p), p["fc"]["kernel"].spec("default").r
      (['fc'], 2)
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"`config` must be a peftjax config, got {type(config).__name__}.")
    if getattr(config, "target_parameters", None):
        raise ConfigError(
            "`target_parameters`: injecting from a state dict is not supported with "
            "`target_parameters` (as in PEFT); inject the adapter without the state dict."
        )
    if not isinstance(state_dict, Mapping):
        raise ArgumentTypeError(
            f"`state_dict`: expected a mapping {{key: tensor}}, got {type(state_dict).__name__}."
        )
    if ranks not in ("config", "state_dict"):
        raise ArgumentTypeError(f"`ranks`: expected 'config' or 'state_dict', got {ranks!r}.")
    if not isinstance(name, str) or not name:
        raise ArgumentTypeError(f"`name` must be a non-empty str, got {name!r}.")
    method = method_of(config)
    key_map = key_map or stacked_key_map()
    leaves = walk(params)[0]
    groups = group_modules(leaves)
    rev = reverse_map(params, key_map, layouts)

    adapter: dict[str, dict[int | None, dict[str, str]]] = {}
    peft_of: dict[tuple[str, int | None], str] = {}
    unmatched: list[str] = []
    for k in sorted(state_dict):
        if not isinstance(k, str):
            raise ArgumentTypeError(f"`state_dict`: keys are str, got {k!r}.")
        norm = _normalize(k, method, name)
        if norm in method.shared_keys:  # an adapter-wide array, not a module
            continue
        kind, pm, suffix = file_key(norm, method)
        if kind not in ("adapter", "whole"):  # modules_to_save copies, base layers
            other = _foreign(norm, method)
            if other is not None:
                raise ConfigError(
                    f"`state_dict` key `{k}` is a {other} adapter key, but `config` is a "
                    f"{type(config).__name__} ({method.name}); use the matching config."
                )
            continue
        hit = rev.get(pm)
        if hit is None:
            unmatched.append(k)
            continue
        mod, layer = hit
        adapter.setdefault(mod, {}).setdefault(layer, {})
        if kind == "adapter":
            adapter[mod][layer][suffix] = k
        peft_of[(mod, layer)] = pm
    if unmatched and strict:
        mods = sorted({m for m, _ in rev.values()})
        raise TargetError(
            f"`state_dict`: {len(unmatched)} key(s) name no module of `params` (module paths "
            f"look like {mods[:5]}; pass `key_map=` if the model names them differently, "
            f"`layouts=` for stacked layers, or `strict=False` to ignore them): {unmatched[:20]}"
        )
    if not adapter:
        raise TargetError(
            f"`state_dict` holds no {config.peft_type} adapter keys (keys end in one of "
            f"{list(method.key_suffixes or [method.whole_infix])}); it has "
            f"{sorted(state_dict)[:5]}."
        )
    _warn_if_config_differs(config, groups, layouts, set(adapter))
    if ranks == "state_dict":
        config = _ranks_from_shapes(config, adapter, peft_of, groups, layouts, state_dict)
    inner, _ = narrowed(config, adapter, peft_of, {})
    inner = dataclasses.replace(inner, modules_to_save=config.modules_to_save)
    new = inject(
        params,
        inner,
        key=key,
        name=name,
        layouts=layouts,
        dtype=dtype,
        activate=activate,
        trainable=trainable,
    )
    out = _fit_to_state_dict(new, name, adapter, state_dict, config, groups, layouts, strict)
    return place(out)


def _normalize(k: str, method, name: str) -> str:
    """A state-dict key in PEFT's checkpoint form: ``_orig_mod.`` dropped, and the adapter
    name after the method's key segment (``lora_A.default.weight`` -> ``lora_A.weight``)."""
    out = k[len(PREFIX) :] if k.startswith(PREFIX) else k
    while out.startswith("_orig_mod."):
        out = out[len("_orig_mod.") :]
    heads = {s.split(".")[0] for s in method.key_suffixes}
    if method.whole_infix:
        heads.add(method.whole_infix)
    for h in sorted(heads, key=len, reverse=True):
        mid, end = f".{h}.{name}.", f".{h}.{name}"
        if mid in out:
            out = out.replace(mid, f".{h}.", 1)
            break
        if out.endswith(end):
            out = out[: -len(name) - 1]
            break
    return out


def _foreign(key: str, method) -> str | None:
    """The name of another registered method whose adapter key ``key`` is (not ``method``'s)."""
    for m in METHODS.values():
        if m.name == method.name or not (m.key_suffixes or m.whole_infix):
            continue
        if m.key_suffixes and any(key.endswith("." + s) for s in m.key_suffixes):
            if not any(key.endswith("." + s) for s in method.key_suffixes):
                return m.name
    return None


def _weight_of(groups, layouts, mod: str):
    w = weight_leaf(groups[mod])
    if w is None:
        return None, None
    return w, resolve_layout(layouts, mod, w.name, w.base)


def _expected(config: AdapterConfig, mod: str, w, lay) -> tuple[Spec, dict[str, tuple]]:
    """The spec ``config`` gives module ``mod`` and ``{PEFT key suffix: one layer's torch
    shape}`` of its arrays (no array is made)."""
    spec = config.module_specs([(mod, lay, tuple(w.base.shape), None)])[0]
    shapes = jax.eval_shape(
        lambda b: spec.init(jax.random.key(0), b), jax.ShapeDtypeStruct(w.base.shape, jnp.float32)
    )
    st = spec.layout.stack
    out = {}
    for arr, (suffix, rule) in spec.file_rules().items():
        if arr in shapes and arr not in spec.shared:
            out[suffix] = tuple(rule.torch_shape(tuple(shapes[arr].shape[st:])))
    return spec, out


def _shape_of(state_dict, k: str):
    shape = getattr(state_dict[k], "shape", None)
    return None if shape is None else tuple(int(d) for d in shape)


def _rank_fits(config, mod, w, lay, keys: dict[str, str], state_dict) -> list[int]:
    """The ranks that make every tensor of ``keys`` (``{suffix: key}``) fit module ``mod``."""
    have = {s: _shape_of(state_dict, k) for s, k in keys.items()}
    cands = sorted({d for s in have.values() if s for d in s if d > 0})
    fits = []
    for r in cands:
        trial = dataclasses.replace(config, rank_pattern=_first({P.exact_regex([mod]): r}, config))
        try:
            _, want = _expected(trial, mod, w, lay)
        except PeftJaxError:
            continue
        if all(want.get(s) == shp for s, shp in have.items() if shp is not None):
            fits.append(r)
    return fits


def _ranks_from_shapes(config, adapter, peft_of, groups, layouts, state_dict) -> AdapterConfig:
    """``config`` with exact-path ``rank_pattern`` entries giving each module the rank its
    tensors have (its own rank where that fits)."""
    if "rank_pattern" not in config.PATTERN_FIELDS or config.rank_alpha("") is None:
        return config  # a method without a LoRA-style rank / rank_pattern: nothing to read
    found: dict[str, int] = {}
    for mod, layers in adapter.items():
        w, lay = _weight_of(groups, layouts, mod)
        if w is None:
            continue
        per_layer = {}
        for i, keys in layers.items():
            for k in keys.values():
                if _shape_of(state_dict, k) is None:
                    raise ArgumentTypeError(
                        f"`state_dict[{k!r}]` has no `.shape`; `ranks='state_dict'` reads the "
                        "ranks from the tensors' shapes."
                    )
            fits = _rank_fits(config, mod, w, lay, keys, state_dict)
            own = config.rank_alpha(peft_of[(mod, i)])[0]
            if not fits:
                raise ShapeError(
                    f"module `{mod}`: no rank makes the state dict's tensors fit it: "
                    f"{ {k: _shape_of(state_dict, k) for k in keys.values()} }."
                )
            per_layer[i] = own if own in fits else fits[0]
        if len(set(per_layer.values())) > 1:
            raise ConfigError(
                f"module `{mod}` is stacked but the state dict gives its layers different ranks "
                f"{ {peft_of[(mod, i)]: r for i, r in per_layer.items()} }; one stacked adapter "
                "has one rank."
            )
        found[mod] = next(iter(per_layer.values()))
    return dataclasses.replace(config, rank_pattern=_first(exact_pattern(found), config))


def _first(exact: dict, config) -> FrozenDict:
    """``exact`` rank-pattern entries before the config's own (the first match wins; a config
    key equal to one of them is replaced)."""
    rest = {k: v for k, v in config.rank_pattern.items() if k not in exact}
    return FrozenDict({**exact, **rest})


def _warn_if_config_differs(config, groups, layouts, from_state_dict: set[str]) -> None:
    """PEFT's warning when the state dict's targets differ from the config's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mts = config.modules_to_save
            save = P.select_modules_to_save(list(groups), mts) if mts else []
            plan = plan_injection(config, groups, layouts, save)
        from_config = {p.module for p in plan}
    except PeftJaxError:
        from_config = set()
    extra_cfg, extra_sd = from_config - from_state_dict, from_state_dict - from_config
    if not (extra_cfg or extra_sd):
        return
    msg = (
        "While injecting the PEFT adapters, an inconsistency was discovered between the PEFT "
        "config and the provided state_dict. This is not necessarily an issue and can be ignored "
        "if this was the intent. "
    )
    if extra_cfg:
        msg += f"The PEFT config contained these additional target modules: {sorted(extra_cfg)}. "
    if extra_sd:
        msg += f"The state_dict contained these additional target modules: {sorted(extra_sd)}. "
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _fit_to_state_dict(new, name, adapter, state_dict, config, groups, layouts, strict):
    """Check every state-dict tensor against the injected arrays (torch layout), and keep on
    each stacked weight only the layers the state dict has (`Spec.layers`, compact)."""
    leaves, treedef = walk(new)
    out = []
    for l in leaves:
        node = l.value
        if not (is_adapted(node) and name in node.names and l.module in adapter):
            out.append(l)
            continue
        spec = node.spec(name)
        if spec.role != DELTA:
            out.append(l)
            continue
        arrays = node.arrays[name]
        rules = spec.file_rules()
        by_suffix = {suffix: (arr, rule) for arr, (suffix, rule) in rules.items()}
        st = spec.layout.stack
        layers = adapter[l.module]
        for keys in layers.values():
            for suffix, k in keys.items():
                if suffix not in by_suffix:
                    if strict:
                        raise ConfigError(
                            f"`state_dict` key `{k}` does not fit the config: module "
                            f"`{l.module}` ({spec.describe()}) has no `{suffix}`."
                        )
                    continue
                arr, rule = by_suffix[suffix]
                want = tuple(rule.torch_shape(tuple(arrays[arr].shape[st:])))
                have = _shape_of(state_dict, k)
                if have is not None and have != want:
                    raise ShapeError(
                        f"`state_dict` key `{k}` has shape {list(have)}; module `{l.module}` "
                        f"({spec.describe()}) expects {list(want)} (torch layout)"
                        + _rank_hint(config, l.module, groups, layouts, keys, state_dict)
                    )
        if st and None not in layers and len(layers) < spec.n_layers:
            idx = sorted(layers)
            n = spec.n_layers
            spec2 = dataclasses.replace(
                spec,
                scaling=tuple(s if j in layers else 0.0 for j, s in enumerate(spec.scaling)),
                layers=tuple(idx),
            )
            sub = {a: v.reshape((n, *v.shape[st:]))[np.asarray(idx)] for a, v in arrays.items()}
            specs = tuple((n_, spec2 if n_ == name else s) for n_, s in node.specs)
            node = node.replace(specs=specs, arrays={**node.arrays, name: sub})
            l = dataclasses.replace(l, value=node)
        out.append(l)
    return rebuild(treedef, out)


def _rank_hint(config, mod, groups, layouts, keys, state_dict) -> str:
    if "rank_pattern" not in config.PATTERN_FIELDS or config.rank_alpha(mod) is None:
        return "."
    try:
        w, lay = _weight_of(groups, layouts, mod)
        fits = _rank_fits(config, mod, w, lay, keys, state_dict)
    except PeftJaxError:
        fits = []
    if not fits:
        return "."
    return (
        f"; the state dict's tensors have rank {fits[0]} there: pass `ranks='state_dict'`, or "
        "set `r` / `rank_pattern`."
    )


# ------------------------------------------------------------------------ conversion to LoRA


def supports_lora_conversion(params, name: str = "default") -> bool:
    """PEFT's ``supports_lora_conversion``: whether every module of adapter ``name`` can be
    converted to LoRA (`convert_to_lora`), i.e. its spec is additive on a Linear weight
    (`Spec.supports_lora_conversion`: LoRA without DoRA, LoHa, LoKr on dense weights, and any
    other method whose spec says so). ``modules_to_save`` copies are carried over as they are.

    Args:
      params: a tree carrying adapter ``name``.
      name: the adapter to check.

    Returns:
      ``True`` when `convert_to_lora` can convert every module of the adapter.

    Raises:
      AdapterNameError: no adapter ``name`` in ``params``.
      AdapterNameTypeError: ``name`` is not a str.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> base = {"fc": {"kernel": jnp.ones((4, 6))}}
      >>> pj.supports_lora_conversion(pj.inject(base, pj.LoHaConfig(target_modules=["fc"]), key=0))
      True
      >>> dora = pj.LoraConfig(target_modules=["fc"], use_dora=True)
      >>> pj.supports_lora_conversion(pj.inject(base, dora, key=0))
      False
    """
    check_names(params, [name], "name")
    return not _unsupported(walk(params)[0], name)[1]


def _unsupported(leaves, name):
    """``(convertible leaves, [(module, description)] that are not)`` of adapter ``name``."""
    ok, bad = [], []
    for l in leaves:
        node = l.value
        if not (is_adapted(node) and name in node.names):
            continue
        spec = node.spec(name)
        if spec.role == COPY and spec.method not in METHODS:  # modules_to_save copy
            continue
        if spec.role == DELTA and spec.supports_lora_conversion:
            ok.append(l)
        else:
            bad.append((l.module, spec.describe()))
    return ok, bad


def _check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ConfigError(f"`rank`={rank!r}: must be an int (the rank) or a float in (0, 1].")
    if isinstance(rank, float) and not (0 < rank <= 1):
        raise ConfigError(
            f"`rank`={rank!r}: if rank is a float, it is interpreted as a threshold. It must be "
            "between 0 and 1."
        )
    if rank == 0 or (isinstance(rank, int) and rank < 0):
        raise ConfigError(f"`rank`={rank!r}: must be a positive int (or a float threshold).")


def _cutoff(s: np.ndarray, threshold: float) -> int:
    """PEFT's ``_find_cutoff_index``: the smallest ``k`` whose top-``k`` singular values hold
    at least ``threshold`` of the energy ``sum(s**2)``."""
    cs = np.cumsum(np.square(s.astype(np.float32)), dtype=np.float32)
    return int(np.searchsorted(cs, threshold * cs[-1], side="left")) + 1


def _layer_deltas(spec: Spec, arrays: dict) -> jax.Array:
    """``(k, in, out)`` float32 deltas of the stored layers on the matrix view."""
    if not spec.layout.stack:
        return spec.delta_matrix(arrays, jnp.float32(spec.scaling[0]))[None]
    k = len(spec.stored_layers)
    st = 1 if spec.compact else spec.layout.stack
    shared = {a: v for a, v in arrays.items() if a in spec.shared}
    flat = {a: v.reshape((k, *v.shape[st:])) for a, v in arrays.items() if a not in spec.shared}
    fn = lambda a, s: spec.delta_matrix({**a, **shared}, s)  # noqa: E731
    return jax.vmap(fn)(flat, spec.stored_scales())


_deltas = jax.jit(_layer_deltas, static_argnums=0)


def _to_lora(module: str, spec: Spec, arrays: dict, rank, dtype):
    """``(lora spec, arrays)`` of one weight: PEFT's ``_convert_module_to_lora`` on the
    matrix view ``dW = U S V^T`` (in, out): ``lora_A = U[:, :k]`` and ``lora_B = S[:k] V^T[:k]``
    (PEFT's ``lora_A = V[:k]``, ``lora_B = U[:, :k] * S[:k]`` of the torch ``(out, in)`` delta;
    the singular values go to B), scale 1 (``lora_alpha = r``). A stacked weight gets one rank
    for all its layers: the largest any layer needs (a float ``rank``)."""
    deltas = _deltas(spec, arrays)
    u, s, vh = jnp.linalg.svd(deltas, full_matrices=False)
    m = s.shape[-1]
    if isinstance(rank, float):
        sv = np.asarray(s)
        k = max(_cutoff(sv[j], rank) for j in range(sv.shape[0]))
    else:
        k = int(rank)
    if k > m:
        raise ConfigError(
            f"`rank`={rank!r}: module `{module}`: the chosen rank {k} is larger than the weight "
            f"shape ({m}), please choose a lower rank."
        )
    a = u[..., :, :k]
    b = s[..., :k, None] * vh[..., :k, :]
    if spec.layout.stack and not spec.compact:
        stack = spec.layout.stack_shape(spec.shape)
        a, b = a.reshape(stack + a.shape[1:]), b.reshape(stack + b.shape[1:])
    elif not spec.layout.stack:
        a, b = a[0], b[0]
    lora_config: Any = method_named(_TARGET).config  # `LoraConfig`: it builds the spec
    lora = lora_config.lora_spec_like(spec, k)
    return lora, {"lora_A": a.astype(dtype), "lora_B": b.astype(dtype)}


def convert_to_lora(params, rank: int | float, name: str = "default", *, new_name=None):
    """Adapter ``name`` converted to a LoRA of rank ``rank``, as PEFT's ``convert_to_lora``:
    each module's delta ``dW`` (float32) is replaced by its truncated SVD, ``lora_A`` the left
    singular vectors, ``lora_B`` the singular values times the right ones, so ``lora_A @
    lora_B = dW`` up to the dropped singular values, with scaling 1 (``lora_alpha = r``).

    Args:
      params: a tree carrying adapter ``name`` (not merged), every module of which supports the
        conversion (`supports_lora_conversion`); ``modules_to_save`` copies are kept.
      rank: an int, the rank of every module; or a float in ``(0, 1]``, an energy threshold:
        each module gets the smallest rank whose singular values hold that fraction of
        ``sum(S**2)`` (PEFT's ``_find_cutoff_index``; a stacked weight, the largest of its
        layers'). `save_pretrained` then writes those ranks as ``rank_pattern`` /
        ``alpha_pattern``.
      name: the adapter to convert.
      new_name: ``None`` (default): the LoRA replaces adapter ``name`` (same name, activity and
        trainability); a new name: the LoRA is added beside the original under it (not
        active, trainability as the original's).

    Returns:
      A new tree; ``params`` is left unchanged. `save_pretrained` writes it as a LoRA adapter
      PEFT loads (`save_as_lora` does both). Signs of singular vectors may differ from torch's
      SVD; the products ``lora_B @ lora_A`` do not.

    Raises:
      ConfigError: an invalid ``rank`` (0, negative, a float outside ``(0, 1]``, larger than a
        weight allows); ``new_name`` already taken.
      UnsupportedModuleError: modules that cannot be converted (named), or none that can.
      MergeError: the adapter is merged.
      AdapterNameError: no adapter ``name``.
      ArgumentTypeError: ``new_name`` is not a non-empty str.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 6))}},
      ...               pj.LoHaConfig(r=2, target_modules=["fc"], init_weights=False), key=0)
      >>> q = pj.convert_to_lora(p, 4)
      >>> spec = q["fc"]["kernel"].spec("default")
      >>> spec.method, spec.r
      ('lora', 4)
      >>> w = pj.apply(lambda p: p["fc"]["kernel"])
      >>> bool(jnp.allclose(w(p), w(q), atol=1e-5))
      True
    """
    _check_rank(rank)
    check_names(params, [name], "name")
    if new_name is not None:
        if not isinstance(new_name, str) or not new_name:
            raise ArgumentTypeError(f"`new_name` must be a non-empty str, got {new_name!r}.")
        if new_name in adapter_names(params):
            raise ConfigError(f"`new_name`: an adapter named {new_name!r} already exists.")
    leaves, treedef = walk(params)
    ok, bad = _unsupported(leaves, name)
    if bad:
        shown = ", ".join(f"`{m}` ({d})" for m, d in bad[:8])
        raise UnsupportedModuleError(
            f"adapter {name!r}: some modules do not support LoRA conversion (PEFT converts "
            f"additive adapters on Linear layers): {shown}" + (" ..." if len(bad) > 8 else "")
        )
    if not ok:
        raise UnsupportedModuleError(
            f"adapter {name!r}: could not detect any layer that supports LoRA conversion."
        )
    merged = [l.module for l in ok if name in l.value.merged]
    if merged:
        raise MergeError(f"adapter {name!r} is merged into `{merged[0]}`; `pj.unmerge` first.")
    if {l.value.spec(name).method for l in ok} == {_TARGET}:
        warnings.warn(
            "Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is "
            "typically no need for that.",
            UserWarning,
            stacklevel=2,
        )
    groups = group_modules(leaves)
    converted = {}
    for l in ok:
        node = l.value
        spec = node.spec(name)
        arrays = with_shared(groups, spec, name, node.arrays[name])
        dtype = next(iter(node.arrays[name].values())).dtype
        converted[l.index] = _to_lora(l.module, spec, arrays, rank, dtype)
    out = []
    for l in leaves:
        node = l.value
        if is_adapted(node) and name in node.names:
            spec, arrays = converted.get(l.index, (node.spec(name), node.arrays[name]))
            if new_name is None:
                specs = tuple((n, spec if n == name else s) for n, s in node.specs)
                node = node.replace(specs=specs, arrays={**node.arrays, name: arrays})
            else:
                node = node.replace(
                    specs=node.specs + ((new_name, spec),),
                    arrays={**node.arrays, new_name: arrays},
                    frozen=node.frozen + ((new_name,) if name in node.frozen else ()),
                )
            l = dataclasses.replace(l, value=node)
        out.append(l)
    return place(rebuild(treedef, out))  # the SVD factors follow sharded bases


def save_as_lora(
    params, path: str | os.PathLike, rank: int | float, name: str = "default", **kwargs
) -> Path:
    """PEFT's ``save_as_lora``: `convert_to_lora` then `save_pretrained` of the LoRA into
    ``path`` itself (whatever ``name`` is); ``kwargs`` go to `save_pretrained` (``key_map``,
    ``dtype``...).

    Args:
      params: a tree carrying adapter ``name`` (not merged); never modified.
      path: the output directory (created if needed); the LoRA is written in it directly.
      rank: as `convert_to_lora`: an int rank, or a float energy threshold in ``(0, 1]``.
      name: the adapter to convert.
      **kwargs: keyword arguments of `save_pretrained` (``key_map``, ``dtype``,
        ``save_embedding_layers``).

    Returns:
      The directory written (``path``).

    Raises:
      ConfigError: an invalid ``rank``, as `convert_to_lora`.
      UnsupportedModuleError: modules that cannot be converted to LoRA.
      MergeError: the adapter is merged.
      AdapterNameError: no adapter ``name``.
      FormatError: ``path`` cannot be written, as `save_pretrained`.

    Example:

      >>> import tempfile, jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 6))}},
      ...               pj.LoHaConfig(r=2, target_modules=["fc"], init_weights=False), key=0)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     config, _ = pj.read_adapter(pj.save_as_lora(p, d, rank=4))
      >>> type(config).__name__, config.r, config.lora_alpha
      ('LoraConfig', 4, 4)
    """
    lora = convert_to_lora(params, rank, name)
    return save_pretrained(_only(lora, name), path, "default", **kwargs)


def _only(params, name: str):
    """The tree with adapter ``name`` alone, renamed ``default`` (active)."""
    leaves, treedef = walk(params)
    out = []
    for l in leaves:
        node = l.value
        if is_adapted(node):
            if name in node.names:
                node = node.replace(
                    specs=(("default", node.spec(name)),),
                    arrays={"default": node.arrays[name]},
                    active=("default",),
                    merged=(),
                    frozen=(),
                )
            else:
                node = node.base
            l = dataclasses.replace(l, value=node)
        out.append(l)
    return rebuild(treedef, out)
