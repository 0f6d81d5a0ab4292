"""HF PEFT adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``: saving and
loading (the orchestration). The generic pieces live apart: the safetensors codec in
`peftjax._safetensors`, PEFT's key naming and ``key_map`` in `peftjax._peft_keys`, the torch
layout rules in `peftjax._torch_layout`. What each method stores is its spec's `file_rules`
(``{array: (PEFT key suffix, torch layout rule)}``) and its registry row's key suffixes
(`peftjax.methods`): this module never names a method.

Inside peftjax every adapter array is in Flax orientation (``in`` before ``out``); on disk it is
what HF PEFT's ``save_pretrained`` writes: torch layouts, keys ``base_model.model.<module
path>.<param>`` with the adapter name removed, float32 by default, ``{"format": "pt"}``
metadata. ``modules_to_save`` copies are whole leaves (``<p>``, the leaf in torch layout), as
are a method's own whole-leaf copies (LN tuning's ``ln_tuning_layers.<p>``).

Module paths: by default a PEFT module path (the key minus ``base_model.model.`` and the suffix)
*is* the peftjax module path. ``key_map`` is a callable ``(module_path) -> PEFT module path``,
called as ``key_map(module_path, layer)`` for stacked (scanned) weights, whose one stacked
adapter stands for one PEFT module per layer (`stacked_key_map`). The same ``key_map`` serves
`save_pretrained` and `load_pretrained` (which inverts it over the modules of ``params``).

`peftjax._safetensors` reads and writes the safetensors format itself (an 8-byte header
length, a JSON header, the raw little-endian bytes), so that bfloat16 works without torch.

What the loaders (`load_pretrained`, `read_adapter`, `inspect_adapter`, `read_safetensors`)
refuse, each with a `FormatError` / `ConfigError` naming the file, key or field:

* a safetensors file the reference implementation (safetensors 0.8) refuses: a header over
  100,000,000 bytes or past the file's end, non-UTF-8 or non-JSON headers, a ``__metadata__``
  that is not a str -> str map, unknown dtypes, shapes that are not non-negative integers,
  offsets that do not tile the data exactly (gaps, overlaps, trailing bytes), sizes that do not
  match ``prod(shape) * itemsize``; the header is checked against the file size before any data
  is read (`parse_header` lists the rules);
* anything but regular files (devices, FIFOs, sockets) and symlinks leading outside the adapter
  directory (an HF hub cache snapshot's ``blobs/`` is inside), before a byte is read; a config
  larger than ``_fs.MAX_JSON_BYTES``; adapter names that are not plain file names;
* integer (or other non-float) adapter tensors; pickle-only adapters;
* an invalid regex in any pattern field of the config;
* a weights file whose ``peftjax.config_sha256`` metadata does not match the config (files of
  two different saves), and, with ``strict=True``, modules the config targets in ``params``
  that the file has no weights for.

`save_pretrained` replaces the weights and the config as one journalled change (see "adapter
dirs" below): a crash at any point leaves the complete old or the complete new adapter, as
peftjax reads it, and no temp files behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _fs, _torch_layout as L, paths as P
from ._journal import (
    BOOKKEEPING,
    CONFIG_NAME,
    DIGEST_KEY,
    JOURNAL_NAME,
    WEIGHTS_NAME,
    atomic_write,
    commit,
    dir_lock,
    needs_recovery,
    recover,
)
from ._peft_keys import (
    BASE_LAYER,
    PREFIX,
    KeyMap,
    map_key,
    split_key,
    stacked_key_map,
    torch_name,
)
from ._plan import matches_parameter, plan_parameters
from ._safetensors import (
    encode_chunks,
    read_safetensors,
    read_safetensors_header,
)
from ._tree import group_modules, walk, weight_leaf
from .config import AdapterConfig
from .errors import (
    AdapterNameError,
    ConfigError,
    FormatError,
    PeftJaxError,
    ShapeError,
    UnsupportedModuleError,
)
from .layout import LayoutSpec, copy_stack, resolve_layout
from .methods import (
    COPY,
    DELTA,
    DERIVED,
    METHODS,
    PEFT_TYPES,
    PROMPT,
    Spec,
    config_from_dict,
    method_named,
    method_of,
    method_of_peft_type,
)
from .node import is_adapted
from .sharding import place, put_like
from .transforms import inject

#: PEFT's key prefix of a prompt-learning model's `modules_to_save` copies (its ``base_model``
#: is the transformers model itself, with no tuner wrapper around it)
PROMPT_PREFIX = "base_model."

__all__ = [
    "CONFIG_NAME",
    "DIGEST_KEY",
    "JOURNAL_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "config_digest",
    "embedding_base_keys",
    "inspect_adapter",
    "load_pretrained",
    "read_adapter",
    "read_safetensors",
    "read_safetensors_header",
    "save_pretrained",
    "stacked_key_map",
    "write_safetensors",
]

PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None
) -> None:
    """Write ``tensors`` as a safetensors file, atomically (temp file + ``os.replace``)."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    specs = {k: (a.shape, a.dtype) for k, a in arrays.items()}
    write_safetensors_streaming(path, specs, arrays.__getitem__, metadata)


def write_safetensors_streaming(
    path: str | os.PathLike,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    produce,
    metadata: Mapping[str, str] | None,
) -> None:
    """Write a safetensors file whose tensors are made one at a time by ``produce(key)``.

    ``specs`` gives each tensor's shape and dtype, so the header is written first and no more
    than one produced tensor is held at a time. Atomic: a temp file renamed when complete.
    """
    atomic_write(Path(path), encode_chunks(specs, produce, metadata))


def config_digest(raw: Mapping[str, Any]) -> str:
    """SHA-256 of what a parsed ``adapter_config.json`` makes an adapter compute (its fields
    minus bookkeeping such as ``base_model_name_or_path``), as stored under `DIGEST_KEY`."""
    d = config_from_dict(raw).to_dict()
    core = {k: v for k, v in d.items() if k not in BOOKKEEPING}
    text = json.dumps(core, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass
class _Files:
    """An adapter directory as read: the parsed config and the weights."""

    dir: Path
    raw: dict
    config: AdapterConfig
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]


def _read_dir(d: Path) -> _Files:
    """Read an adapter directory safely: recover an interrupted peftjax save first, then read
    the config and the weights under a shared lock, and check the weights' config digest."""
    with dir_lock(d, exclusive=False):
        if not needs_recovery(d):
            return _read_files(d)
    if not os.access(d, os.W_OK):
        if os.path.lexists(d / JOURNAL_NAME):
            raise FormatError(
                f"`{d}` holds an interrupted peftjax save (`{JOURNAL_NAME}`) and is read-only, "
                "so it cannot be completed; make it writable and load again."
            )
        with dir_lock(d, exclusive=False):
            return _read_files(d)
    with dir_lock(d, exclusive=True) as fd:
        recover(d, fd)
        return _read_files(d)


def _read_files(d: Path) -> _Files:
    raw = _read_config_dict(d)
    f = d / CONFIG_NAME
    try:
        config = config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"`{f}`: {e}") from None
    tensors, meta = _read_weights(d)
    want = meta.get(DIGEST_KEY)
    if want is not None and want != config_digest(raw):
        raise FormatError(
            f"`{d / WEIGHTS_NAME}` was saved with a different `{CONFIG_NAME}` than `{f}` (its "
            f"`{DIGEST_KEY}` metadata does not match): the two files come from different saves, "
            "and loading them would give the wrong ranks or scaling. Save the adapter again, or "
            "restore the matching config."
        )
    return _Files(d, raw, config, tensors, meta)


# ---------------------------------------------------------------------------------- save


def _layers(spec: Spec) -> list[int | None]:
    """Layer indices of a spec that carry the adapter (``[None]`` when not stacked): the stored
    slices (`Spec.layers`) with a nonzero scaling."""
    if not spec.layout.stack:
        return [None]
    return [i for i in spec.stored_layers if spec.scaling[i] != 0]


@dataclasses.dataclass
class _Entry:
    """One adapted PEFT module of an adapter: where it lives and its static spec."""

    peft_path: str
    module: str
    layer: int | None
    spec: Spec


#: PEFT's ``EMBEDDING_LAYER_NAMES``: modules ``save_embedding_layers=True`` writes.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _writes_base(spec: Spec, leaf, save_embedding_layers: bool | str) -> bool:
    if save_embedding_layers is False or spec.role != DELTA:
        return False
    if spec.carries_base:
        return True
    return save_embedding_layers is True and (
        spec.layout.kind == "embed" or leaf.module.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES
    )


def _collect(
    params, name: str, key_map: KeyMap, dtype, save_embedding_layers: bool | str = "auto"
) -> tuple[dict, list[_Entry], list[str]]:
    """``(tensors, adapter entries, modules_to_save paths)`` of adapter ``name``, in PEFT form."""
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    entries: list[_Entry] = []
    copies: list[str] = []  # PEFT module paths of `modules_to_save` copies

    def put(key: str, value: np.ndarray, where: str):
        if key in tensors:
            raise FormatError(
                f"`key_map` sends both `{owner[key]}` and `{where}` to the PEFT key `{key}`."
            )
        owner[key] = where
        if jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(np.float32 if dtype is None else jnp.dtype(dtype))
        tensors[key] = np.ascontiguousarray(value)

    all_leaves = walk(params)[0]
    by_module = group_modules(all_leaves)
    # PEFT keys a prompt-learning model's `modules_to_save` copies `base_model.<module>...`
    prompt = any(
        is_adapted(l.value) and name in l.value.names and l.value.spec(name).role == PROMPT
        for l in all_leaves
    )
    copy_prefix = PROMPT_PREFIX if prompt else PREFIX
    for leaf in all_leaves:
        node = leaf.value
        if not is_adapted(node) or name not in node.names:
            continue
        spec, arrays = node.spec(name), node.arrays[name]
        where = ".".join(leaf.names)
        if spec.role == PROMPT:  # its own keys (the spec's `file_tensors`)
            pm = map_key(key_map, leaf.module, None)
            entries.append(_Entry(pm, leaf.module, None, spec))
            for k, v in spec.file_tensors(arrays, pm).items():
                put(k, v, where)
            continue
        if _writes_base(spec, leaf, save_embedding_layers):
            if spec.layout.stack:
                raise FormatError(
                    f"`{where}`: saving the base weights of a stacked module is not supported."
                )
            pm = map_key(key_map, leaf.module, None)
            for other in by_module[leaf.module]:
                if other is not leaf and is_adapted(other.value):
                    continue  # another adapted leaf of the module: written with its own flag
                b = other.value.base if is_adapted(other.value) else other.value
                b = np.asarray(b)
                tname = torch_name(other.name)
                put(
                    f"{PREFIX}{pm}.{BASE_LAYER}.{tname}",
                    L.leaf_rule(other.name, b.shape).to_torch(b),
                    where,
                )
        if spec.role == DERIVED:
            continue
        if spec.role == COPY:
            tname = torch_name(leaf.name)
            mid = f"{spec.file_infix}." if spec.file_infix else ""
            a = np.asarray(arrays["weight"])
            st = spec.layout.stack
            # a stacked copy (a scanned model's norm) is one PEFT module per layer
            per_layer = a.reshape((-1, *a.shape[st:])) if st else [a]
            for j, ai in enumerate(per_layer):
                pm = map_key(key_map, leaf.module, j if st else None)
                rule = L.leaf_rule(leaf.name, ai.shape)
                put(f"{copy_prefix}{pm}.{mid}{tname}", rule.to_torch(ai), where)
                if spec.method in METHODS:  # a method's own copy (LN tuning): its modules
                    entries.append(_Entry(pm, leaf.module, j if st else None, spec))
                else:
                    copies.append(pm)
            continue
        rules = spec.file_rules()
        if not rules:
            raise FormatError(
                f"`{where}`: adapter {name!r} ({spec.describe()}) has no PEFT format."
            )
        arrays = spec.constrain(arrays)  # PEFT saves what its forward rewrote (COFT)
        for arr_name, (key, rule) in spec.shared_file_keys().items():  # once, on the holder
            put(key, rule.to_torch(np.asarray(arrays[arr_name])), where)
        host = {n: np.asarray(arrays[n]) for n in rules}  # one device -> host copy per array
        param = spec.file_parameter()
        for i in _layers(spec) if param is None else [None]:
            pm = fm = map_key(key_map, leaf.module, i)
            if param is not None:  # `target_parameters`: whole arrays, under the module
                pm, fm = _parameter_paths(key_map, *param)
            entries.append(_Entry(pm, leaf.module, i, spec))
            layer = host if i is None else spec.layer_arrays(host, i)  # stored slice of layer i
            for arr_name, (suffix, rule) in rules.items():
                put(f"{PREFIX}{fm}.{suffix}", rule.to_torch(layer[arr_name]), where)
    return tensors, entries, copies


def _parameter_paths(key_map: KeyMap, param: str, nest: int) -> tuple[str, str]:
    """``(PEFT parameter path, PEFT module path its keys use)`` of a parameter targeted by
    ``target_parameters`` (`Spec.file_parameter`): ``key_map`` maps the parameter's module;
    each of the ``nest`` wrappers PEFT puts around it adds ``.base_layer``."""
    parent, _, pname = param.rpartition(".")
    mp = map_key(key_map, parent, None)
    return f"{mp}.{pname}", mp + f".{BASE_LAYER}" * nest


def config_from_specs(entries: list[_Entry], copies: list[str]) -> AdapterConfig:
    """Rebuild a PEFT config from the specs of one adapter (targets = exact PEFT paths); the
    method's config class does the method's part (`AdapterConfig.from_specs`)."""
    if not entries:
        raise ConfigError(
            "the adapter holds only `modules_to_save` copies; PEFT needs a method config: pass "
            "`config=` to `save_pretrained`."
        )
    methods = {e.spec.method for e in entries}
    if len(methods) > 1:
        raise ConfigError(f"the adapter mixes methods {sorted(methods)}; PEFT has one per adapter.")
    if entries[0].spec.role == PROMPT:  # a prompt adapter keeps its whole config
        prompt_spec: Any = entries[0].spec  # a `PromptSpec`: it carries its config
        return prompt_spec.config.file_config(prompt_spec)
    common: dict[str, Any] = dict(
        target_modules=sorted({e.peft_path for e in entries}),
        modules_to_save=sorted(set(copies)) or None,
        inference_mode=True,
    )
    return method_named(methods.pop()).config.from_specs(entries, common)


def _check_config(config: AdapterConfig, entries: list[_Entry]) -> None:
    """A `config=` given to `save_pretrained` must describe the adapter that is saved."""
    methods = {e.spec.method for e in entries}
    if entries and methods != {config.method}:
        raise ConfigError(
            f"`config` is a {type(config).__name__} but the adapter is {sorted(methods)}."
        )
    if entries and entries[0].spec.role == PROMPT:
        prompt_spec: Any = entries[0].spec  # a `PromptSpec`: it checks its own config
        prompt_spec.check_config(config)
        return
    targets = config.target_modules
    for e in entries:
        if e.spec.file_parameter() is not None:  # PEFT's `target_parameters` rule
            if not matches_parameter(e.peft_path, getattr(config, "target_parameters", None)):
                raise ConfigError(
                    f"`config` does not target parameter `{e.peft_path}` (`target_parameters`), "
                    "which carries the adapter; PEFT would not load its weights."
                )
            config.check_module(e.peft_path, e.spec)
            continue
        hit = (
            P.is_all_linear(targets)
            or P.matches_target(
                e.peft_path,
                targets,
                layers_to_transform=getattr(config, "layers_to_transform", None),
                layers_pattern=getattr(config, "layers_pattern", None),
            )
        ) and not P.is_excluded(e.peft_path, config.exclude_modules)
        if not hit:
            raise ConfigError(
                f"`config` does not target module `{e.peft_path}`, which carries the adapter; "
                "PEFT would not load its weights."
            )
        config.check_module(e.peft_path, e.spec)
    for e in entries:
        ra = config.rank_alpha(e.peft_path)
        if ra is None:
            continue
        r, alpha = ra
        s = config.scaling(r, alpha)
        ranked: Any = e.spec  # a config with a rank has ranked specs (`r`, `scaling`)
        have = ranked.scaling[e.layer or 0]
        if r != ranked.r or not math.isclose(s, have, rel_tol=1e-6):
            raise ConfigError(
                f"`config` gives module `{e.peft_path}` r={r}, scaling={s:g}, but its adapter has "
                f"r={ranked.r}, scaling={have:g}; PEFT would compute a different delta."
            )


def save_pretrained(
    params,
    path: str | os.PathLike,
    name: str = "default",
    *,
    key_map: KeyMap | None = None,
    dtype=None,
    config: AdapterConfig | None = None,
    save_embedding_layers: bool | str = "auto",
) -> Path:
    """Write adapter ``name`` in HF PEFT's format: safetensors weights + ``adapter_config.json``.

    The two files are replaced together (a journalled commit, see the module docstring): after a
    crash at any point, a peftjax loader finds the complete old adapter or the complete new one.

    Args:
      params: a tree carrying adapter ``name``.
      path: the output directory (created if needed). As PEFT, the ``default`` adapter is written
        in ``path`` itself and any other in ``path/<name>/``.
      name: the adapter to save.
      key_map: ``(module_path[, layer]) -> PEFT module path``; default `stacked_key_map()`
        (identity, with ``.layers.<i>.`` inserted for stacked weights).
      dtype: dtype of the saved float tensors (default float32, PEFT's default).
      config: the config to write. Default: rebuilt from the adapter's specs (targets are the
        exact PEFT module paths; per-module ranks and alphas in ``rank_pattern`` /
        ``alpha_pattern``). A given config is checked against the adapter's ranks and scalings.
      save_embedding_layers: PEFT's argument: ``"auto"`` writes the base weights of modules
        whose adapter carries them (loaded from a PEFT file with ``<module>.base_layer.weight``
        keys); ``True`` also writes them for every adapted embedding / ``embed_tokens`` /
        ``lm_head`` module; ``False`` never writes base weights.

    Returns:
      The directory written (a ``pathlib.Path``: ``path``, or ``path/<name>``).

    Raises:
      AdapterNameError: ``params`` has no adapter ``name`` (or ``name`` is not a non-empty,
        plain file name).
      ConfigError: an invalid ``save_embedding_layers``; a ``config`` that is not a peftjax
        config, is of another method, or does not target (or gives other ranks / scalings
        than) the adapter's modules.
      FormatError: ``path`` is a file or cannot be created; ``key_map`` sends two modules to
        one PEFT key; an adapter with no PEFT format (or a stacked module's base weights).

    Example:

      >>> import os, tempfile, jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     out = pj.save_pretrained(p, d)
      ...     sorted(os.listdir(out))
      ['adapter_config.json', 'adapter_model.safetensors']
    """
    if not isinstance(name, str) or not name:
        raise AdapterNameError(f"`name` must be a non-empty str, got {name!r}.")
    _fs.check_plain_name(name, "`name` (the adapter's name, also its subdirectory)")
    if save_embedding_layers not in (True, False, "auto"):
        raise ConfigError(
            f"`save_embedding_layers`={save_embedding_layers!r}: use True, False or 'auto'."
        )
    key_map = key_map or stacked_key_map()
    tensors, entries, copies = _collect(params, name, key_map, dtype, save_embedding_layers)
    if not tensors:
        names = sorted({n for l in walk(params)[0] if is_adapted(l.value) for n in l.value.names})
        raise AdapterNameError(
            f"`name`: no adapter named {name!r} to save; the adapters are {names}."
        )
    if config is None:
        config = config_from_specs(entries, copies)
    elif not isinstance(config, AdapterConfig):
        raise ConfigError(f"`config` must be a peftjax config, got {type(config).__name__}.")
    else:
        _check_config(config, entries)
    out = Path(path) if name == "default" else Path(path) / name
    d = config.to_dict()
    d["inference_mode"] = True  # as PEFT's save_pretrained
    text = json.dumps(d, indent=2, sort_keys=True)
    meta = {"format": "pt", DIGEST_KEY: config_digest(json.loads(text))}
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    specs = {k: (a.shape, a.dtype) for k, a in arrays.items()}
    if os.path.lexists(out) and not out.is_dir():
        raise FormatError(f"`{out}` exists and is not a directory; cannot save an adapter there.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FormatError(f"cannot create adapter directory `{out}`: {e.strerror or e}.") from None
    commit(
        out,
        [
            (WEIGHTS_NAME, encode_chunks(specs, arrays.__getitem__, meta)),
            (CONFIG_NAME, [text.encode()]),
        ],
    )
    return out


# ---------------------------------------------------------------------------------- read


def _adapter_dir(path: str | os.PathLike, name: str = "default") -> Path:
    _fs.check_plain_name(name, "`name` (the adapter's name, also its subdirectory)")
    p = Path(path)
    if p.is_file() and p.name in (WEIGHTS_NAME, CONFIG_NAME):
        p = p.parent
    if not p.exists():
        raise FormatError(f"adapter directory `{p}` does not exist.")
    if not p.is_dir():
        raise FormatError(f"`{p}` is not a directory; point at a PEFT adapter directory.")
    if (
        not os.path.lexists(p / CONFIG_NAME)
        and name != "default"
        and os.path.lexists(p / name / CONFIG_NAME)
    ):
        p = p / name
    return p


def _read_config_dict(d: Path) -> dict:
    f = d / CONFIG_NAME
    if not os.path.lexists(f):
        raise FormatError(f"`{d}` has no `{CONFIG_NAME}`; is it an HF PEFT adapter directory?")
    data = _fs.read_regular_file(f, "adapter config", max_bytes=_fs.MAX_JSON_BYTES)
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"`{f}` is not valid JSON: {e}.") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"`{f}` does not hold a JSON object.")
    pt = cfg.get("peft_type")
    if not isinstance(pt, str) or pt.upper() not in PEFT_TYPES:
        raise FormatError(
            f"`{f}`: peft_type {pt!r} is not supported; peftjax reads {sorted(PEFT_TYPES)}."
        )
    return cfg


def _read_weights(d: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    f = d / WEIGHTS_NAME
    if not os.path.lexists(f):
        pickles = [n for n in PICKLE_NAMES if os.path.lexists(d / n)]
        if pickles:
            raise FormatError(
                f"`{d}` holds `{pickles[0]}` but no `{WEIGHTS_NAME}`: peftjax never loads pickle "
                'files (they can run code). Convert it once with torch: `python -c "import torch; '
                "from safetensors.torch import save_file; "
                f"save_file(torch.load('{pickles[0]}', weights_only=True), '{WEIGHTS_NAME}', "
                "metadata={'format': 'pt'})\"` to safetensors."
            )
        raise FormatError(f"`{d}` has no `{WEIGHTS_NAME}`.")
    return read_safetensors(f)


def _check_float(files: _Files) -> None:
    """Adapter files hold floating-point weights only (an integer tensor would be cast)."""
    for k, v in sorted(files.tensors.items()):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise FormatError(
                f"`{files.dir / WEIGHTS_NAME}`: tensor `{k}` has dtype {v.dtype}; adapter "
                "weights must be floating point."
            )


def read_adapter(
    path: str | os.PathLike, name: str = "default"
) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
    """``(config, tensors)`` of a PEFT adapter directory, tensors as stored (torch layout, full
    PEFT keys).

    Args:
      path: the adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
      name: the adapter's name: ``path/<name>`` is read when ``path`` itself has no config and
        that subdirectory exists (PEFT's layout for non-default adapters).

    Returns:
      ``(config, tensors)``: the config object (``LoraConfig``, ...) and ``{PEFT key: numpy
      array}`` exactly as stored (torch ``(out, in)`` layout, dtype as saved).

    Raises:
      FormatError: a missing directory, config or weights file; unreadable, truncated or
        non-float files; an unknown ``peft_type``; a config that does not match the weights.
      ConfigError: config fields peftjax does not support (or invalid values).

    Example:

      >>> import tempfile, jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = pj.save_pretrained(p, d)
      ...     config, tensors = pj.read_adapter(d)
      >>> config.r, sorted(tensors)
      (2, ['base_model.model.fc.lora_A.weight', 'base_model.model.fc.lora_B.weight'])
      >>> tensors["base_model.model.fc.lora_A.weight"].shape  # torch layout: (r, in)
      (2, 4)
    """
    files = _read_dir(_adapter_dir(path, name))
    _check_float(files)
    return files.config, files.tensors


def file_key(key: str, method) -> tuple[str, str, str]:
    """``(kind, PEFT module path, suffix)`` of a key of a ``method`` adapter file (its registry
    row); see `peftjax._peft_keys.split_key`."""
    return split_key(key, method.key_suffixes, method.whole_infix)


def embedding_base_keys(tensors: Mapping[str, Any], peft_type: str) -> dict[str, str]:
    """The base-layer weights an adapter carries (PEFT's ``save_embedding_layers``), as
    ``{model checkpoint key: adapter key}``: ``base_model.model.model.embed_tokens.base_layer.
    weight`` is ``{"model.embed_tokens.weight": "base_model.model.model.embed_tokens.base_layer.
    weight"}``. A merge must use these instead of the model checkpoint's own weights.

    >>> embedding_base_keys({"base_model.model.lm_head.base_layer.weight": None}, "LORA")
    {'lm_head.weight': 'base_model.model.lm_head.base_layer.weight'}
    """
    out = {}
    for k in sorted(tensors):
        kind, mod, param = file_key(k, method_of_peft_type(peft_type))
        if kind == "base":
            out[f"{mod}.{param}"] = k
    return out


def inspect_adapter(path: str | os.PathLike, name: str = "default") -> dict[str, Any]:
    """A summary of a PEFT adapter directory (for the CLI): method, targets, ranks, sizes.

    Args:
      path: the adapter directory.
      name: the adapter's name (``path/<name>`` is read when ``path`` has no config), as
        `read_adapter`.

    Returns:
      A JSON-serialisable dict: ``path``, ``peft_type``, ``method``, ``targets`` (adapted PEFT
      module paths), ``modules_to_save`` (whole-module copies), ``embedding_layers`` (modules
      whose base weights the adapter carries: PEFT's ``save_embedding_layers``, see
      `embedding_base_keys`), ``ranks`` (``{module: r}``), ``n_tensors``, ``n_params``,
      ``dtype``, ``file_size`` (bytes of the weights file) and ``config`` (its ``to_dict()``).

    Raises:
      FormatError: as `read_adapter` (missing or unreadable files, unknown ``peft_type``).
      ConfigError: config fields peftjax does not support.

    Example:

      >>> import tempfile, jax.numpy as jnp, peftjax as pj
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}},
      ...               pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = pj.save_pretrained(p, d)
      ...     info = pj.inspect_adapter(d)
      >>> info["peft_type"], info["targets"], info["ranks"], info["n_params"]
      ('LORA', ['fc'], {'fc': 2}, 14)
    """
    files = _read_dir(_adapter_dir(path, name))
    d, raw, config, tensors = files.dir, files.raw, files.config, files.tensors
    pt = raw["peft_type"].upper()
    method = method_of(config)
    targets: set[str] = set()
    saved: set[str] = set()
    embedding: set[str] = set()
    for k in tensors:
        if k in method.shared_keys:  # adapter-wide (VeRA's projections): no module of its own
            continue
        kind, mod, _ = file_key(k, method)
        if kind in ("adapter", "whole"):
            targets.add(mod)
        elif kind == "base":
            embedding.add(mod)
        else:
            saved.add(mod)
    ranks = {}
    for t in sorted(targets):
        ra = config.rank_alpha(t)
        if ra is not None:
            ranks[t] = ra[0]
    dtypes = sorted({str(v.dtype) for v in tensors.values()})
    return {
        "path": str(d),
        "peft_type": pt,
        "method": config.method_label,
        "targets": sorted(targets),
        "modules_to_save": sorted(saved),
        "embedding_layers": sorted(embedding),
        "ranks": ranks,
        "n_tensors": len(tensors),
        "n_params": int(sum(v.size for v in tensors.values())),
        "dtype": ",".join(dtypes),
        "file_size": os.stat(d / WEIGHTS_NAME).st_size,
        "config": config.to_dict(),
    }


# ---------------------------------------------------------------------------------- load


def reverse_map(params, key_map: KeyMap, layouts: LayoutSpec) -> dict[str, tuple[str, int | None]]:
    """``{PEFT module path: (module path, layer)}`` over every module of ``params``."""
    leaves, _ = walk(params)
    out: dict[str, tuple[str, int | None]] = {}
    for mod, group in group_modules(leaves).items():
        w = weight_leaf(group)
        n = 0
        if w is not None:
            try:
                lay = resolve_layout(layouts, mod, w.name, w.base)
                n = math.prod(lay.stack_shape(tuple(w.base.shape))) if lay.stack else 0
            except UnsupportedModuleError:
                n = 0
        if not n:  # a stacked norm (LN tuning copies it, one PEFT module per layer)
            st = max(copy_stack(layouts, mod, l.base) for l in group)
            if st:
                n = math.prod(tuple(group[0].base.shape)[:st])
                out.setdefault(map_key(key_map, mod, None), (mod, None))
        for i in range(n) if n else [None]:
            try:
                out.setdefault(map_key(key_map, mod, i), (mod, i))
            except FormatError:
                break
    return out


def _check_targets_present(d: Path, config, params, key_map, layouts, present: set[str]):
    """``strict``: every module of ``params`` that the file's config targets (PEFT's matching
    on the PEFT module paths, as `inject` would select) must have weights in the file."""
    if config.target_modules is None:
        return
    leaves, _ = walk(params)
    items: list[tuple[str, str, int]] = []  # (PEFT path, weight leaf name, matrix ndim)
    where: dict[str, str] = {}
    for mod, group in group_modules(leaves).items():
        w = weight_leaf(group)
        if w is None and not method_of(config).whole_modules:
            continue
        n, ndim = 0, len(getattr(w.base, "shape", ())) if w is not None else 0
        if w is not None:
            try:
                lay = resolve_layout(layouts, mod, w.name, w.base)
                if lay.stack:
                    n = math.prod(lay.stack_shape(tuple(w.base.shape)))
                    ndim -= lay.stack
            except UnsupportedModuleError:
                pass
        for i in range(n) if n else [None]:
            try:
                pm = map_key(key_map, mod, i)
            except FormatError:
                break
            items.append((pm, w.name if w is not None else "", ndim))
            where[pm] = mod if i is None else f"{mod} [layer {i}]"
    keys = [pm for pm, _, _ in items if pm]
    if not keys:
        return
    targets = config.target_modules
    linear = None
    if P.is_all_linear(targets):
        linear = P.select_all_linear(items, task_type=config.task_type)
    mts = config.modules_to_save
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save = P.select_modules_to_save(keys, mts) if mts else []
            chosen = P.select_modules(
                keys,
                target_modules=targets,
                exclude_modules=config.exclude_modules,
                modules_to_save=save,
                linear_modules=linear,
                forbid_with_str_target=False,
            )
    except PeftJaxError:
        return  # the config targets nothing here: the file's keys decide (checked elsewhere)
    ltt = getattr(config, "layers_to_transform", None)
    if ltt is not None and not isinstance(targets, str):
        eff = set(linear) if linear is not None else targets
        chosen = [
            k
            for k in chosen
            if P.matches_target(
                k, eff, layers_to_transform=ltt, layers_pattern=config.layers_pattern
            )
        ]
    lacking = [where[k] for k in chosen if k not in present]
    if lacking:
        raise FormatError(
            f"`{d / WEIGHTS_NAME}` has no weights for {len(lacking)} module(s) that "
            f"`{d / CONFIG_NAME}` targets in `params`: {lacking[:20]}; pass `strict=False` to "
            "load the others (or `key_map=` if the model names them differently)."
        )


def exact_pattern(values: dict[str, Any]) -> dict[str, Any]:
    """An exact-path rank/alpha pattern (longest paths first: the first match wins)."""
    order = sorted(values, key=lambda p: (-p.count("."), -len(p), p))
    return {re.escape(p): values[p] for p in order}


def load_pretrained(
    params,
    path: str | os.PathLike,
    name: str = "default",
    *,
    key_map: KeyMap | None = None,
    layouts: LayoutSpec = None,
    dtype=jnp.float32,
    strict: bool = True,
    activate: bool | None = None,
    is_trainable: bool = True,
):
    """``params`` with adapter ``name`` injected from an HF PEFT adapter directory.

    The directory is ``path`` itself (or ``path/<name>`` when ``path`` has no config and that
    exists, PEFT's layout for non-default adapters). The config comes from
    ``adapter_config.json``; the adapted modules are exactly those present in
    ``adapter_model.safetensors``, each PEFT module path mapped to a module of ``params`` by
    inverting ``key_map`` (default `stacked_key_map()`: the PEFT path minus
    ``base_model.model.`` is the module path; stacked weights take ``...layers.<i>...``).

    Args:
      params: the base tree (never modified).
      path: the adapter directory.
      name: the name the adapter gets in ``params``.
      key_map: ``(module_path[, layer]) -> PEFT module path``, the same one `save_pretrained` uses.
      layouts: as `inject` (stacked and DenseGeneral weights).
      dtype: dtype of the adapter arrays (float32, as PEFT).
      strict: raise when the file has keys that match no module or lacks a targeted array.
      activate: as `inject` (default: active when it is the first adapter).
      is_trainable: PEFT's ``PeftModel.from_pretrained(..., is_trainable=)``: ``False`` loads the
        adapter frozen (0 trainable parameters, see `pj.set_trainable`). The default is ``True``,
        unlike PEFT's, so that "load, then keep training" works as written; the files' own
        ``inference_mode: true`` (which every PEFT save writes) does not freeze it.

    Returns:
      A new tree with adapter ``name`` injected and its arrays loaded (cast to ``dtype``);
      ``params`` is left unchanged.

    Raises:
      FormatError: missing, truncated or pickle-only files, unknown ``peft_type``, keys that match
        no module, missing arrays.
      ConfigError: config fields peftjax does not support.
      ShapeError: a tensor whose shape does not fit its module (names key, expected, found).
      AdapterNameError: ``params`` already has an adapter ``name``.

    Example:

      >>> import tempfile, jax.numpy as jnp, peftjax as pj
      >>> base = {"fc": {"kernel": jnp.ones((4, 3))}}
      >>> p = pj.inject(base, pj.LoraConfig(r=2, target_modules=["fc"]), key=0)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = pj.save_pretrained(p, d)
      ...     q = pj.load_pretrained(base, d)
      >>> pj.adapter_names(q), q["fc"]["kernel"].spec("default").r
      (('default',), 2)
    """
    key_map = key_map or stacked_key_map()
    files = _read_dir(_adapter_dir(path, name))
    _check_float(files)
    if files.config.route is not None:  # prompt learning: bare keys, read by the spec
        kw = dict(layouts=layouts, dtype=dtype, activate=activate, trainable=bool(is_trainable))
        return _load_prompt(params, files, name, key_map, strict, **kw)
    plan = _plan_load(params, files, key_map, layouts, strict)
    new, concrete = _inject_shapes(
        params,
        plan.config,
        name=name,
        layouts=layouts,
        dtype=dtype,
        activate=activate,
        trainable=bool(is_trainable),
    )
    return _build_load(params, new, concrete, plan, files, name, dtype, strict)


def _load_prompt(params, files: _Files, name, key_map, strict, *, dtype, **kw):
    """`load_pretrained` of a prompt-learning adapter: `inject` its config (as
    ``inference_mode=True``: no init reads anything, e.g. a multitask source checkpoint), then
    take every spec's arrays from the file (its `arrays_from_file`, with the loaded spec:
    PEFT's file holds the encoder's output) and the ``modules_to_save`` copies from
    ``base_model.<module>.<param>``."""
    config = dataclasses.replace(files.config, inference_mode=True)
    try:
        new = inject(params, config, key=jax.random.key(0), name=name, dtype=dtype, **kw)
    except PeftJaxError as e:
        raise type(e)(f"`{files.dir / CONFIG_NAME}`: {e}") from None
    tensors, used = files.tensors, set[str]()
    leaves, treedef = walk(new)
    out = []
    for leaf in leaves:
        node = leaf.value
        if is_adapted(node) and name in node.names:
            spec = node.spec(name)
            pm = map_key(key_map, leaf.module, None)
            if spec.role == PROMPT:
                spec = spec.loaded_spec()
                try:
                    arrays = spec.arrays_from_file(tensors, pm, used, dtype)
                except PeftJaxError as e:
                    raise type(e)(f"`{files.dir / WEIGHTS_NAME}`: {e}") from None
                node = _with_spec(node, name, spec)
            elif spec.role == COPY:
                k = f"{PROMPT_PREFIX}{pm}.{torch_name(leaf.name)}"
                if k not in tensors:
                    raise FormatError(
                        f"`{files.dir / WEIGHTS_NAME}` lacks `{k}`, the `modules_to_save` copy "
                        f"of `{leaf.module}` that the config implies."
                    )
                shape = tuple(node.base.shape)
                val = _from_file(k, tensors[k], L.leaf_rule(leaf.name, shape), shape)
                used.add(k)
                arrays = {"weight": jnp.asarray(val, node.base.dtype)}
            else:
                arrays = node.arrays[name]
            node = node.replace(arrays={**node.arrays, name: arrays})
            leaf = dataclasses.replace(leaf, value=node)
        out.append(leaf.value)
    left = sorted(set(tensors) - used)
    if strict and left:
        raise FormatError(
            f"`{files.dir / WEIGHTS_NAME}`: {len(left)} key(s) do not fit the "
            f"{files.config.peft_type} config ({type(files.config).__name__}): {left[:20]}"
        )
    return place(jax.tree_util.tree_unflatten(treedef, out))


@dataclasses.dataclass
class _LoadPlan:
    """What `load_pretrained` found in the files, per module of ``params``.

    ``adapter``: ``{module: {layer: {suffix: key}}}`` of the method's arrays (a module copied
    whole has an empty entry); ``leaf_keys``: ``{(kind, module, torch param): key}`` of whole
    leaves (``whole`` copies, ``copy`` = ``modules_to_save``, ``base`` layers); ``config``: the
    file's config narrowed to exactly those modules; ``scales``: ``{module: {layer: scale}}``."""

    adapter: dict
    leaf_keys: dict
    unmatched: list
    config: AdapterConfig
    scales: dict


def _plan_load(params, files: _Files, key_map, layouts, strict: bool) -> _LoadPlan:
    """Match the file's keys to the modules of ``params`` and narrow its config to them."""
    d, config, tensors = files.dir, files.config, files.tensors
    method = method_of(config)
    rev = reverse_map(params, key_map, layouts)
    targets, order = _parameter_targets(params, config, key_map, layouts, tensors)
    rev.update({fm: (mod, None) for fm, (mod, _, _) in targets.items()})
    adapter: dict[str, dict[int | None, dict[str, str]]] = {}
    # {(kind, module, suffix): key}, or {layer: key} for a stacked copy's layers
    leaf_keys: dict[tuple[str, str, str], Any] = {}
    peft_of: dict[tuple[str, int | None], str] = {}
    present: set[str] = set()  # PEFT module paths the file has adapter weights for
    unmatched = []
    for k in sorted(tensors):
        if k in method.shared_keys:  # an adapter-wide array (the holder spec reads it)
            continue
        kind, pm, suffix = file_key(k, method)
        hit = rev.get(pm)
        if hit is None or (kind == "copy" and not getattr(config, "modules_to_save", None)):
            unmatched.append(k)
            continue
        mod, layer = hit
        if kind in ("adapter", "whole"):
            present.add(pm)
        if kind == "adapter":
            adapter.setdefault(mod, {}).setdefault(layer, {})[suffix] = k
            peft_of[(mod, layer)] = targets[pm][1] if pm in targets else pm
        elif layer is not None and kind != "whole":
            unmatched.append(k)
        else:
            if layer is None:
                leaf_keys[(kind, mod, suffix)] = k
            else:  # one layer of a stacked copy: {layer: key}
                leaf_keys.setdefault((kind, mod, suffix), {})[layer] = k
            if kind == "whole":
                adapter.setdefault(mod, {})
                peft_of[(mod, None)] = map_key(key_map, mod, None)
    if unmatched and strict:
        raise FormatError(
            f"`{d / WEIGHTS_NAME}`: {len(unmatched)} key(s) match no module of `params` "
            f"(module paths look like {sorted(set(m for m, _ in rev.values()))[:5]}; pass "
            "`key_map=` if the model names them differently, `layouts=` for stacked layers): "
            f"{unmatched[:20]}"
        )
    if not adapter:
        raise FormatError(f"`{d / WEIGHTS_NAME}` holds no {config.peft_type} adapter weights.")
    if strict:
        _check_targets_present(d, config, params, key_map, layouts, present)
        lacking = sorted(pp for fm, (_, pp, _) in targets.items() if fm not in present)
        if lacking:
            raise FormatError(
                f"`{d / WEIGHTS_NAME}` has no weights for {len(lacking)} parameter(s) that "
                f"`{d / CONFIG_NAME}` targets (`target_parameters`) in `params`: {lacking[:20]}; "
                "pass `strict=False` to load the others."
            )
    params_of = {mod: param for mod, _, param in targets.values()}
    inner, scales = narrowed(config, adapter, peft_of, leaf_keys, params_of)
    if order:  # exact parameter paths, listed so that `inject` nests them as the file does
        inner = dataclasses.replace(inner, target_parameters=order)
    return _LoadPlan(adapter, leaf_keys, unmatched, inner, scales)


def _parameter_targets(params, config, key_map, layouts, tensors=None):
    """``({PEFT module path of the keys: (module, PEFT parameter path, parameter path)},
    [parameter paths, innermost wrapper first])`` of the parameters ``config.
    target_parameters`` targets in ``params`` (`plan_parameters`). PEFT nests the targeted
    parameters of one module in the torch module's parameter order, which a config need not
    list them in: where the file's shapes fit exactly one other nesting, that one is taken."""
    if not getattr(config, "target_parameters", None):
        return {}, []
    plan = plan_parameters(config, group_modules(walk(params)[0]), layouts)
    by_parent: dict[str, list] = {}
    for p in plan:
        by_parent.setdefault(p.param.rpartition(".")[0], []).append(p)
    if tensors is not None:
        for group in by_parent.values():
            if len(group) > 1:
                _nest_by_shapes(group, config, key_map, tensors)
    out = {}
    for p in plan:
        pp, fm = _parameter_paths(key_map, p.param, p.nest)
        out[fm] = (p.module, pp, p.param)
    order = [p.param for p in sorted(plan, key=lambda p: (-p.nest, p.weight.index))]
    return out, order


def _nest_by_shapes(group: list, config, key_map, tensors) -> None:
    """Re-nest ``group`` (planned parameters of one PEFT module) in place when the file's
    tensors fit exactly one nesting and not the planned one."""

    def want(p, nest):
        spec = config.parameter_spec(p.param, nest, p.layout, tuple(p.weight.base.shape))
        base = jax.ShapeDtypeStruct(spec.shape, jnp.float32)
        shapes = jax.eval_shape(lambda b: spec.init(jax.random.key(0), b), base)
        return {
            sfx: tuple(r.torch_shape(tuple(shapes[a].shape)))
            for a, (sfx, r) in spec.file_rules().items()
        }

    def fits(p, nest):
        fm = _parameter_paths(key_map, p.param, nest)[1]
        have = {
            sfx: tuple(tensors[k].shape)
            for sfx in want(p, nest)
            if (k := f"{PREFIX}{fm}.{sfx}") in tensors
        }
        return bool(have) and all(want(p, nest)[sfx] == shp for sfx, shp in have.items())

    k = len(group)
    if all(fits(p, p.nest) for p in group):
        return
    ok = [perm for perm in itertools.permutations(range(k)) if all(map(fits, group, perm))]
    if len(ok) == 1:
        for p, nest in zip(group, ok[0]):
            p.nest = nest


def narrowed(config: AdapterConfig, adapter: dict, peft_of: dict, leaf_keys: dict, params_of=None):
    """``(config, scales)``: the file's config narrowed to exactly the modules present, with
    each module's rank and alpha as exact-path patterns where they differ. ``params_of``:
    ``{module: parameter path}`` of the targeted parameters (``target_parameters``, kept as
    the file has it; their rank / alpha patterns are keyed by parameter path, as PEFT's)."""
    params_of = params_of or {}
    regular = [m for m in adapter if m not in params_of]
    kw: dict[str, Any] = dict(
        target_modules=f"(?:{P.exact_regex(regular)})" if regular or not params_of else (),
        exclude_modules=None,
    )
    if hasattr(config, "layers_to_transform"):
        kw.update(layers_to_transform=None, layers_pattern=None)
    mts = sorted({m for (kind, m, _) in leaf_keys if kind == "copy"})
    kw["modules_to_save"] = mts or None
    paths = {m: [peft_of[(m, i)] for i in layers] for m, layers in adapter.items()}
    scales: dict[str, dict[int | None, float]] = {}
    ranks, alphas = {}, {}
    for mod, layers in adapter.items():
        maybe = {i: config.rank_alpha(peft_of[(mod, i)]) for i in layers}
        if not maybe or None in maybe.values():  # no rank / alpha: scale 1
            scales[mod] = {i: 1.0 for i in layers}
            continue
        ra = {i: v for i, v in maybe.items() if v is not None}
        if len({r for r, _ in ra.values()}) > 1:
            per_layer = {peft_of[(mod, i)]: r for i, (r, _) in ra.items()}
            raise ConfigError(
                f"module `{mod}` is stacked but its layers have different ranks {per_layer}; "
                "one stacked adapter has one rank."
            )
        key = params_of.get(mod, mod)
        ranks[key], alphas[key] = next(iter(ra.values()))
        scales[mod] = {i: config.scaling(r, a) for i, (r, a) in ra.items()}
    if ranks:
        for field, pat, vals in (
            ("r", "rank_pattern", ranks),
            (config.alpha_field, "alpha_pattern", alphas),
        ):
            if len(set(vals.values())) == 1:
                kw[field], kw[pat] = next(iter(vals.values())), {}
            else:
                kw[pat] = exact_pattern(vals)
    kw.update(config.narrowed_fields(paths))
    return dataclasses.replace(config, **kw), scales


def _build_load(params, new, concrete: bool, plan: _LoadPlan, files: _Files, name, dtype, strict):
    """The injected tree ``new`` with adapter ``name``'s arrays (and carried base layers) taken
    from the file."""
    tensors, d = files.tensors, files.dir
    used: set[str] = set()
    missing: list[str] = []
    orig = walk(params)[0]
    leaves, treedef = walk(new)
    out = []
    for j, leaf in enumerate(leaves):
        node = leaf.value
        if not concrete:
            # the abstract tree gets the real leaves, bases and other adapters' arrays back
            old = orig[j].value
            if is_adapted(node):
                base = old.base if is_adapted(old) else old
                node = node.replace(base=base, arrays=dict(old.arrays) if is_adapted(old) else {})
            else:
                node = old
        if is_adapted(node) and name in node.names:
            spec = node.spec(name)
            init = _Init(spec, node.base, dtype, j, node.arrays.get(name) if concrete else None)
            if spec.role == COPY:
                kind = "whole" if spec.method in METHODS else "copy"
                arrays = _copy_from_file(plan, leaf, node, kind, spec, tensors, used, missing, init)
            elif spec.role == DERIVED:
                arrays = {}
            else:
                spec, arrays = _fill(
                    spec,
                    init,
                    plan.adapter.get(leaf.module, {}),
                    plan.scales.get(leaf.module),
                    tensors,
                    used,
                    missing,
                    leaf.module,
                    dtype,
                )
                arrays.update(
                    _shared_from_file(spec, init, tensors, used, missing, dtype, leaf.module, name)
                )
                node = _with_spec(node, name, spec)
            node = node.replace(arrays={**node.arrays, name: arrays})
        out.append(_carried_base(plan, leaf, node, name, tensors, used))
    if strict and missing:
        raise FormatError(
            f"`{d / WEIGHTS_NAME}` lacks {len(missing)} array(s) the config implies: {missing[:20]}"
        )
    left = sorted(set(tensors) - used - set(plan.unmatched))
    if strict and left:
        raise FormatError(
            f"`{d / WEIGHTS_NAME}`: {len(left)} key(s) do not fit the {files.config.peft_type} "
            f"config ({type(files.config).__name__}): {left[:20]}"
        )
    return place(jax.tree_util.tree_unflatten(treedef, out))  # arrays follow sharded bases


def _shared_from_file(spec, init, tensors, used, missing, dtype, module, name) -> dict:
    """A holder spec's shared arrays (`Spec.shared`): from the file where it has them (PEFT's
    ``save_projection``), else `inject`'s values (VeRA regenerates them from its seed). A key
    the holder writes (`Spec.shared_file_keys`) but the file lacks is ``missing``."""
    out = {}
    keys = spec.shared_file_keys()
    for arr_name in spec.shared if spec.shared_holder() is None else ():
        key, rule = keys.get(arr_name, (None, None))
        have = init()[arr_name]
        if key is not None and key in tensors:
            try:
                val = _from_file(key, tensors[key], rule, tuple(have.shape))
            except ShapeError as err:
                raise ShapeError(
                    f"adapter {name!r}, module `{module}` (it holds `{key}`, which every module "
                    f"of the adapter uses; its size is planned over all of them): {err}"
                ) from None
            out[arr_name] = jnp.asarray(val, dtype)
            used.add(key)
        else:
            if key is not None:
                missing.append(key)
            out[arr_name] = jnp.asarray(have, dtype)
    return out


def _with_spec(node, name: str, spec):
    return node.replace(specs=tuple((n, spec if n == name else s) for n, s in node.specs))


def _copy_from_file(plan, leaf, node, kind, spec, tensors, used, missing, init) -> dict:
    """The arrays of a copy (``whole`` method copy or ``modules_to_save``) from the file."""
    tn = torch_name(leaf.name)
    k = plan.leaf_keys.get((kind, leaf.module, tn))
    base = node.base
    if k is None:
        mid = f"{spec.file_infix}." if spec.file_infix else ""
        missing.append(f"{leaf.module}.{mid}{tn}")
        return init()
    if isinstance(k, dict):  # a stacked copy: one key per layer
        st = spec.layout.stack
        n, layer_shape = math.prod(tuple(base.shape)[:st]), tuple(base.shape)[st:]
        have = init()["weight"] if len(k) < n else None
        parts = []
        for i in range(n):
            if i not in k:
                missing.append(f"{leaf.module}[layer {i}].{tn}")
                parts.append(np.asarray(have).reshape((n, *layer_shape))[i])
                continue
            rule = L.leaf_rule(leaf.name, layer_shape)
            parts.append(_from_file(k[i], tensors[k[i]], rule, layer_shape))
            used.add(k[i])
        return {"weight": jnp.asarray(np.stack(parts).reshape(base.shape), base.dtype)}
    rule = L.leaf_rule(leaf.name, tuple(base.shape))
    val = _from_file(k, tensors[k], rule, tuple(base.shape))
    used.add(k)
    return {"weight": jnp.asarray(val, base.dtype)}


def _carried_base(plan, leaf, node, name, tensors, used):
    """``node`` with the base-layer weight the adapter carries (PEFT's
    ``save_embedding_layers``) in place of its base, if the file has one."""
    k = plan.leaf_keys.get(("base", leaf.module, torch_name(leaf.name)))
    if k is None:
        return node
    base = node.base if is_adapted(node) else node
    rule = L.leaf_rule(leaf.name, tuple(base.shape))
    val = jnp.asarray(_from_file(k, tensors[k], rule, tuple(base.shape)), base.dtype)
    val = put_like(val, base)  # where the base weight it replaces was (a mesh)
    used.add(k)
    if not is_adapted(node):
        return val
    node = node.replace(base=val)
    if name in node.names and not node.spec(name).carries_base:
        # remember that this adapter brings the base weights (save_pretrained)
        node = _with_spec(node, name, dataclasses.replace(node.spec(name), carries_base=True))
    return node


def _inject_shapes(params, config, **kw):
    """`inject` without computing any initial value (``jax.eval_shape``): the adapter arrays
    come from the file. Returns ``(tree, concrete)``; falls back to a real `inject` (``concrete``
    True) for trees that ``eval_shape`` cannot take (non-array leaves)."""
    fn = lambda p: inject(p, config, key=jax.random.key(0), **kw)  # noqa: E731
    leaves = jax.tree_util.tree_leaves(params)
    if all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves):
        return jax.eval_shape(fn, params), False
    return fn(params), True


class _Init:
    """The arrays `inject` would give one node, computed only if some are not in the file."""

    def __init__(self, spec: Spec, base, dtype, index: int, have=None):
        self.spec, self.base, self.dtype, self.index, self.have = spec, base, dtype, index, have

    def __call__(self) -> dict:
        if self.have is None:
            key = jax.random.fold_in(jax.random.key(0), self.index)
            self.have = self.spec.init(key, self.base, self.dtype)
        return dict(self.have)


def _from_file(key: str, t: np.ndarray, rule: L.Rule, shape: tuple[int, ...]) -> np.ndarray:
    want = rule.torch_shape(tuple(shape))
    if tuple(t.shape) != tuple(want):
        raise ShapeError(
            f"tensor `{key}` has shape {list(t.shape)}; the module expects {list(want)} "
            "(torch layout)."
        )
    return rule.from_torch(t, tuple(shape))


def _fill(spec: Spec, init: _Init, layers: dict, scales, tensors, used, missing, module, dtype):
    """One node's arrays of the loaded adapter, from the file, and its spec. A stacked weight
    gets exactly the layers the file has: `Spec.layers` lists them when some are absent (their
    arrays compact, their scaling ``0``). A layer the file has but that lacks an array
    (``strict=False``) takes `inject`'s initial value for it."""
    rules = spec.file_rules()
    whole = spec.file_parameter() is not None  # `target_parameters`: one tensor per array
    stack = () if whole else spec.layout.stack_shape(spec.shape)
    n = math.prod(stack) if stack else 1
    idx: list[int | None] = [None] if not stack else [i for i in range(n) if i in layers]
    if stack and len(idx) < n:
        spec = dataclasses.replace(
            spec,
            scaling=tuple(s if i in layers else 0.0 for i, s in enumerate(spec.scaling)),
            layers=tuple(i for i in idx if i is not None),
        )
    base = jax.ShapeDtypeStruct(spec.shape, jnp.float32)
    shapes = jax.eval_shape(lambda b: spec.init(jax.random.key(0), b, dtype), base)
    arrays = {}
    for arr_name, (suffix, rule) in rules.items():
        shape = tuple(shapes[arr_name].shape)
        layer_shape = shape[len(stack) :] if not spec.compact else shape[1:]
        parts: list[np.ndarray | None] = []
        for i in idx:
            k = layers.get(i, {}).get(suffix)
            if k is None:
                if i in layers:
                    missing.append(f"{module}{'' if i is None else f'[layer {i}]'}.{suffix}")
                parts.append(None)
                continue
            parts.append(_from_file(k, tensors[k], rule, layer_shape))
            used.add(k)
        if any(p is None for p in parts):  # `inject`'s values (a full stack: its layer i)
            fallback = np.asarray(init()[arr_name]).reshape((n, *layer_shape))
            parts = [fallback[i or 0] if p is None else p for i, p in zip(idx, parts)]
        full = [p for p in parts if p is not None]  # every slot is filled now
        stacked = np.stack(full).reshape(shape) if stack else full[0]
        arrays[arr_name] = jnp.asarray(stacked, dtype)
    if scales is not None:
        every = range(n) if stack else [None]
        new = tuple(float(scales.get(i, 0.0)) if i in layers else 0.0 for i in every)
        new = new * spec.n_layers if whole else new
        if new != tuple(spec.scaling):
            spec = dataclasses.replace(spec, scaling=new)
    return spec, arrays
