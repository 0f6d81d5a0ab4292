"""Adapter configs: frozen, hashable dataclasses with HF PEFT 0.21's field names and defaults.

Every config is immutable and hashable, so it can be a `jax.jit` static argument. List-valued
fields are stored as tuples and dict-valued fields (`rank_pattern`, `alpha_pattern`) as a
`FrozenDict`, which keeps insertion order (PEFT's pattern rule takes the *first* matching key).

Values are checked at construction and every error is a `ConfigError` (a `ValueError`) that names
the field and the value. Normalisations, all of which keep PEFT's meaning:

- `target_modules`, `exclude_modules`, `feedforward_modules` given as lists become *sorted,
  de-duplicated* tuples: PEFT turns them into sets, so their order never matters and two configs
  that differ only in that order are equal (one `jit` trace). `"all-linear"` is matched
  case-insensitively by PEFT and stored lower-case.
- Empty `exclude_modules`, `feedforward_modules`, `modules_to_save`, `layers_to_transform` and
  `layers_pattern` become `None` (PEFT treats an empty value as "not set").
- `target_modules=None` is accepted, as in PEFT, which fills it in from a table of model types when
  the adapter is injected. peftjax has no such table: injecting with `target_modules=None` raises.
  An empty `target_modules` list is rejected (PEFT only allows it together with `target_parameters`,
  which peftjax does not support).

PEFT fields that do not change the math are accepted by `from_dict` and dropped; `to_dict` writes
them back with PEFT's defaults so that PEFT loads the file. PEFT fields that do change the math and
that peftjax does not implement raise `ConfigError` whenever they hold a non-default value. Each
class lists both sets in `PEFT_IGNORED_FIELDS` and `PEFT_UNSUPPORTED_FIELDS` (name -> PEFT default).
Keys that PEFT 0.21 does not know at all are ignored, as PEFT ignores them.

`fan_in_fan_out` is accepted and has no effect on peftjax's math: it only tells PEFT that a torch
weight is stored `(in, out)` (GPT-2's `Conv1D`). Flax kernels are always `(in, out)`; the layout of
the torch file is the file-format module's business.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal, TypeVar

from peftjax.errors import ConfigError

__all__ = [
    "PEFT_FORMAT_VERSION",
    "PEFT_TYPES",
    "AdapterConfig",
    "FrozenDict",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "config_from_dict",
]

#: The HF PEFT release whose `adapter_config.json` layout `to_dict` reproduces (written as
#: `peft_version`; PEFT reads that field to pick backward-compatible behaviour).
PEFT_FORMAT_VERSION = "0.21.2"

#: PEFT's `TaskType` values (PEFT raises for any other non-None `task_type`).
TASK_TYPES = frozenset(
    {"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"}
)

_V = TypeVar("_V")
_C = TypeVar("_C", bound="AdapterConfig")


class FrozenDict(Mapping[str, _V]):
    """An immutable, hashable mapping that keeps insertion order.

    Equality is order-sensitive (also against a plain `dict`), because the order of a
    `rank_pattern` decides which key wins; the hash agrees with that equality.

    >>> FrozenDict({"q_proj": 4, "v_proj": 8})["v_proj"]
    8
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, _V] | None = None) -> None:
        self._data: dict[str, _V] = dict(data) if data is not None else {}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return list(self._data.items()) == list(other.items())

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (self._data,))


# ----------------------------------------------------------------------------- checks


def _fail(name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"`{name}`={value!r}: {why}")


def _unsupported(name: str, value: Any, default: Any) -> ConfigError:
    return _fail(
        name,
        value,
        f"not supported by peftjax (it changes the adapter's math); use the default {default!r}.",
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _fail(name, v, "must be True or False.")
    return v


def _check_rank(name: str, v: Any) -> int:
    if not _is_int(v) or v <= 0:
        raise _fail(name, v, "the rank must be a positive integer.")
    return v


def _check_alpha(name: str, v: Any) -> int | float:
    if not _is_real(v):
        raise _fail(name, v, "must be a finite number.")
    return v


def _check_dropout(name: str, v: Any) -> int | float:
    if not _is_real(v) or not 0 <= v < 1:
        raise _fail(name, v, "a dropout probability must satisfy 0 <= p < 1.")
    return v


def _check_opt_str(name: str, v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise _fail(name, v, "must be a string or None.")
    return v


def _str_seq(name: str, v: Any) -> tuple[str, ...]:
    """A list/tuple/set of strings as a tuple (order kept); a bare str is rejected."""
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, (list, tuple, set, frozenset)):
        raise _fail(name, v, "must be a list of strings.")
    if not all(isinstance(x, str) for x in v):
        raise _fail(name, v, "every entry must be a string.")
    return tuple(v)


def _module_names(name: str, v: Any, *, empty_ok: bool) -> str | tuple[str, ...] | None:
    """`target_modules`-like: None, a regex str, or a list of names (-> sorted unique tuple)."""
    if v is None:
        return None
    if isinstance(v, str):
        if not v:
            raise _fail(name, v, "an empty regex matches no module; give a pattern or a list.")
        return "all-linear" if v.lower() == "all-linear" else v
    names = tuple(sorted(set(_str_seq(name, v))))
    if not names:
        if empty_ok:
            return None
        raise _fail(name, v, "an empty list targets nothing; give module names or a regex.")
    return names


def _check_regex(name: str, pattern: str, wrapped: str | None = None) -> None:
    """``pattern`` must compile as the regex PEFT builds from it (``wrapped`` with ``{}`` for
    the pattern, e.g. a ``rank_pattern`` key is used in ``(.*\\.)?({})$``)."""
    try:
        re.compile(pattern if wrapped is None else wrapped.replace("{}", pattern))
    except (re.error, RecursionError, OverflowError) as err:
        raise _fail(name, pattern, f"not a valid regex: {err}.") from None


def _regex_field(name: str, v: Any) -> Any:
    if isinstance(v, str) and v != "all-linear":
        _check_regex(name, v)
    return v


def _modules_to_save(v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    names = _str_seq("modules_to_save", v)
    return names or None


def _layers_to_transform(v: Any) -> int | tuple[int, ...] | None:
    if v is None:
        return None
    if _is_int(v):
        if v < 0:
            raise _fail("layers_to_transform", v, "layer indices are non-negative.")
        return v
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, (list, tuple, set, frozenset)):
        raise _fail("layers_to_transform", v, "must be an int or a list of ints.")
    if not all(_is_int(i) and i >= 0 for i in v):
        raise _fail("layers_to_transform", v, "every entry must be a non-negative int.")
    return tuple(sorted(set(v))) or None


def _layers_pattern(v: Any) -> str | tuple[str, ...] | None:
    if v is None or isinstance(v, str):
        out = v or None
    else:
        out = _str_seq("layers_pattern", v) or None
    for p in (out,) if isinstance(out, str) else out or ():
        _check_regex("layers_pattern", p, r"(?:^|.*?\.){}\.(\d+)\.")
    return out


def _pattern(name: str, v: Any, check: Any) -> FrozenDict:
    if v is None:
        return FrozenDict()
    if not isinstance(v, Mapping):
        raise _fail(name, v, "must be a dict from module-name pattern to value.")
    for key, val in v.items():
        if not isinstance(key, str) or not key:
            raise _fail(name, v, f"key {key!r} must be a non-empty string.")
        _check_regex(f"{name} key", key, r"(.*\.)?({})$")
        check(f"{name}[{key!r}]", val)
    return v if isinstance(v, FrozenDict) else FrozenDict(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (set, frozenset)):
        return sorted(_jsonable(x) for x in v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# ----------------------------------------------------------------------------- base


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Fields every PEFT config has. Not used directly: use one of the method configs."""

    peft_type: ClassVar[str] = ""
    method: ClassVar[str] = ""
    #: PEFT fields accepted by `from_dict` and dropped (they do not change the math), with the
    #: value `to_dict` writes for them.
    PEFT_IGNORED_FIELDS: ClassVar[Mapping[str, Any]] = FrozenDict(
        {"auto_mapping": None, "peft_version": PEFT_FORMAT_VERSION}
    )
    #: PEFT fields that change the math and that peftjax does not implement, with PEFT's default:
    #: any other value raises `ConfigError` (in `from_dict`; `to_dict` writes the default).
    PEFT_UNSUPPORTED_FIELDS: ClassVar[Mapping[str, Any]] = FrozenDict()

    # PEFT's `PeftConfig` fields (metadata only).
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    # Module selection, common to every method.
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not type(self).peft_type:
            raise TypeError(f"{type(self).__name__} is abstract; use LoraConfig, LoHaConfig, ...")
        task = self.task_type
        if task is not None and not (isinstance(task, str) and task in TASK_TYPES):
            raise _fail(
                "task_type", self.task_type, f"must be None or one of {sorted(TASK_TYPES)}."
            )
        _check_opt_str("base_model_name_or_path", self.base_model_name_or_path)
        _check_opt_str("revision", self.revision)
        _check_bool("inference_mode", self.inference_mode)
        self._set(
            "target_modules",
            _regex_field(
                "target_modules",
                _module_names("target_modules", self.target_modules, empty_ok=False),
            ),
        )
        self._set(
            "exclude_modules",
            _regex_field(
                "exclude_modules",
                _module_names("exclude_modules", self.exclude_modules, empty_ok=True),
            ),
        )
        self._set("modules_to_save", _modules_to_save(self.modules_to_save))
        for m in self.modules_to_save or ():
            # PEFT matches each entry as a regex inside `(^|.*\.){m}($|\..*)`
            _check_regex("modules_to_save", m, r"(^|.*\.){}($|\..*)")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check_layers(self, *, str_targets_forbidden: bool) -> None:
        """Normalise and check `layers_to_transform` / `layers_pattern` (LoRA, LoHa, LoKr)."""
        given = self.layers_to_transform is not None
        self._set("layers_to_transform", _layers_to_transform(self.layers_to_transform))
        self._set("layers_pattern", _layers_pattern(self.layers_pattern))
        if given and self.layers_to_transform is None:
            # PEFT: an empty `layers_to_transform` means every layer; `layers_pattern` is moot.
            self._set("layers_pattern", None)
        if str_targets_forbidden and isinstance(self.target_modules, str):
            for name in ("layers_to_transform", "layers_pattern"):
                if getattr(self, name) is not None:
                    raise _fail(
                        name,
                        getattr(self, name),
                        f"cannot be used when `target_modules` is a str "
                        f"({self.target_modules!r}); give `target_modules` as a list.",
                    )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise _fail(
                "layers_pattern",
                self.layers_pattern,
                "needs `layers_to_transform` to be set as well.",
            )

    # ------------------------------------------------------------------ dict conversion

    @classmethod
    def from_dict(cls: type[_C], d: Mapping[str, Any]) -> _C:
        """Builds the config from a parsed `adapter_config.json` (PEFT's or peftjax's).

        A `peft_type` key must name this class's type (any case). PEFT fields that do not change
        the math and keys unknown to PEFT are ignored; unsupported math-changing PEFT fields raise
        `ConfigError` when they hold a non-default value.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"expected a dict parsed from adapter_config.json, got {d!r}.")
        if cls is AdapterConfig:
            return config_from_dict(d)  # type: ignore[return-value]
        peft_type = d.get("peft_type")
        if peft_type is not None and str(peft_type).upper() != cls.peft_type:
            raise _fail(
                "peft_type",
                peft_type,
                f"{cls.__name__} reads only peft_type {cls.peft_type!r}; "
                f"use config_from_dict to dispatch on the type.",
            )
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in own:
                kwargs[key] = value
            elif key in cls.PEFT_UNSUPPORTED_FIELDS:
                default = cls.PEFT_UNSUPPORTED_FIELDS[key]
                if value != default:
                    raise _unsupported(key, value, default)
            # else: PEFT_IGNORED_FIELDS, `peft_type`, `runtime_config` or unknown to PEFT: dropped
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Every field PEFT 0.21 writes to `adapter_config.json` for this config, JSON-ready.

        `json.dumps(cfg.to_dict(), indent=2, sort_keys=True)` is the file PEFT would write.
        """
        out: dict[str, Any] = {}
        out.update(_jsonable(self.PEFT_IGNORED_FIELDS))
        out.update(_jsonable(self.PEFT_UNSUPPORTED_FIELDS))
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        out["peft_type"] = self.peft_type
        return out


# ----------------------------------------------------------------------------- LoRA

_LORA_INITS_SUPPORTED = (True, False, "gaussian")
# init_lora_weights values PEFT 0.21 knows but peftjax does not implement (they change the base
# weights, need data or freeze a factor); also "pissa_niter_<n>" and "corda..." prefixes.
_LORA_INITS_UNSUPPORTED = frozenset(
    {"pissa", "olora", "loftq", "eva", "corda", "orthogonal", "mica", "lora_ga"}
)


def _lora_init(v: Any) -> bool | str:
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        low = v.lower()
        if low == "gaussian":
            return "gaussian"
        if low in _LORA_INITS_UNSUPPORTED or low.startswith(("pissa_niter_", "corda")):
            raise _fail(
                "init_lora_weights",
                v,
                "this initialisation is not supported by peftjax; "
                f"use one of {list(_LORA_INITS_SUPPORTED)}.",
            )
    raise _fail("init_lora_weights", v, f"unknown value; use one of {list(_LORA_INITS_SUPPORTED)}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA (and DoRA with `use_dora=True`), as HF PEFT's `LoraConfig`.

    `scaling = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; `rank_pattern` and
    `alpha_pattern` override r and alpha per module.

    >>> cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    >>> cfg.scaling(cfg.r, cfg.lora_alpha)
    2.0
    """

    peft_type: ClassVar[str] = "LORA"
    method: ClassVar[str] = "lora"
    PEFT_IGNORED_FIELDS: ClassVar[Mapping[str, Any]] = FrozenDict(
        {
            **AdapterConfig.PEFT_IGNORED_FIELDS,
            # Select torch Megatron tensor-parallel layer classes; same math.
            "megatron_config": None,
            "megatron_core": "megatron.core",
            # Sub-configs PEFT reads only for their own `init_lora_weights` value (rejected here)
            # or for `use_qalora=True` (rejected); PEFT itself ignores them otherwise.
            "loftq_config": FrozenDict(),
            "eva_config": None,
            "corda_config": None,
            "lora_ga_config": None,
            "qalora_group_size": 16,
            # Torch bookkeeping for tied modules; in a JAX tree a tied weight is one leaf.
            "ensure_weight_tying": False,
        }
    )
    PEFT_UNSUPPORTED_FIELDS: ClassVar[Mapping[str, Any]] = FrozenDict(
        {
            "use_qalora": False,  # QA-LoRA: pooled inputs
            "alora_invocation_tokens": None,  # aLoRA: adapter on only part of the sequence
            "velora_config": None,  # VeLoRA: compressed-activation backward pass
            "monteclora_config": None,  # MonteCLoRA: stochastic adapter weights
            "use_bdlora": None,  # BD-LoRA: block-diagonal factors
            "arrow_config": None,  # Arrow: routing between adapters
            "kasa_config": None,  # KaSA: truncates the base weight, adds lora_diag
        }
    )

    r: int = 8
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: FrozenDict[int] = dataclasses.field(default_factory=FrozenDict)
    alpha_pattern: FrozenDict[int | float] = dataclasses.field(default_factory=FrozenDict)
    use_dora: bool = False
    # PEFT fields that change the math; only their defaults are supported.
    lora_bias: bool = False
    layer_replication: None = None
    target_parameters: None = None
    trainable_token_indices: None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        _check_dropout("lora_dropout", self.lora_dropout)
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias"):
            _check_bool(name, getattr(self, name))
        if self.bias not in ("none", "all", "lora_only"):
            raise _fail("bias", self.bias, "must be 'none', 'all' or 'lora_only'.")
        if self.bias != "none":
            raise _unsupported("bias", self.bias, "none")
        if self.lora_bias:
            raise _unsupported("lora_bias", self.lora_bias, False)
        for name in ("layer_replication", "target_parameters", "trainable_token_indices"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (list, tuple, dict)) and not value):
                raise _unsupported(name, value, None)
            self._set(name, None)
        self._set("init_lora_weights", _lora_init(self.init_lora_weights))
        self._check_layers(str_targets_forbidden=True)
        self._set("rank_pattern", _pattern("rank_pattern", self.rank_pattern, _check_rank))
        self._set("alpha_pattern", _pattern("alpha_pattern", self.alpha_pattern, _check_alpha))

    def scaling(self, r: int, alpha: float) -> float:
        """PEFT's LoRA scale: `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`."""
        _check_rank("r", r)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


# ----------------------------------------------------------------------------- LyCORIS


@dataclasses.dataclass(frozen=True, kw_only=True)
class _LycorisConfig(AdapterConfig):
    r: int = 8
    alpha: int | float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool | str = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: FrozenDict[int] = dataclasses.field(default_factory=FrozenDict)
    alpha_pattern: FrozenDict[int | float] = dataclasses.field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        _check_dropout("rank_dropout", self.rank_dropout)
        _check_dropout("module_dropout", self.module_dropout)
        _check_bool("use_effective_conv2d", self.use_effective_conv2d)
        # PEFT does not forbid layers_* with a str target_modules here (unlike LoRA): matching
        # then ignores them, as PEFT's `check_target_module_exists` does.
        self._check_layers(str_targets_forbidden=False)
        self._set("rank_pattern", _pattern("rank_pattern", self.rank_pattern, _check_rank))
        self._set("alpha_pattern", _pattern("alpha_pattern", self.alpha_pattern, _check_alpha))

    def scaling(self, r: int, alpha: float) -> float:
        """PEFT's LyCORIS scale for rank `r` and alpha `alpha`: `alpha / r`."""
        _check_rank("r", r)
        return alpha / r


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoHaConfig(_LycorisConfig):
    """LoHa (Hadamard product of two low-rank products), as HF PEFT's `LoHaConfig`.

    >>> LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]).scaling(4, 8)
    2.0
    """

    peft_type: ClassVar[str] = "LOHA"
    method: ClassVar[str] = "loha"

    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bool("init_weights", self.init_weights)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoKrConfig(_LycorisConfig):
    """LoKr (Kronecker product of two factors), as HF PEFT's `LoKrConfig`.

    `init_weights` is True (w1 = 0), False (all random) or "lycoris" (w2 = 0).

    >>> LoKrConfig(r=4, alpha=8, decompose_both=False, decompose_factor=-1).method
    'lokr'
    """

    peft_type: ClassVar[str] = "LOKR"
    method: ClassVar[str] = "lokr"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | Literal["lycoris"] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bool("decompose_both", self.decompose_both)
        _check_bool("rank_dropout_scale", self.rank_dropout_scale)
        if not _is_int(self.decompose_factor):
            raise _fail(
                "decompose_factor", self.decompose_factor, "must be an int (-1: automatic)."
            )
        if not isinstance(self.init_weights, bool) and self.init_weights != "lycoris":
            raise _fail("init_weights", self.init_weights, "must be True, False or 'lycoris'.")


# ----------------------------------------------------------------------------- IA3, LN tuning


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(AdapterConfig):
    """(IA)^3: learned vectors scaling a module's output (or its input, for feedforward modules).

    When `target_modules` and `feedforward_modules` are both lists, every feedforward name must be
    one of the target names (PEFT's rule: a plain set inclusion, not a match).

    >>> IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]).feedforward_modules
    ('wo',)
    """

    peft_type: ClassVar[str] = "IA3"
    method: ClassVar[str] = "ia3"

    feedforward_modules: str | tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        ff = _regex_field(
            "feedforward_modules",
            _module_names("feedforward_modules", self.feedforward_modules, empty_ok=True),
        )
        self._set("feedforward_modules", ff)
        _check_bool("fan_in_fan_out", self.fan_in_fan_out)
        _check_bool("init_ia3_weights", self.init_ia3_weights)
        targets = self.target_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
            raise _fail(
                "feedforward_modules",
                list(ff),
                f"must be a subset of `target_modules` ({list(targets)}); "
                f"missing {sorted(set(ff) - set(targets))}.",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LNTuningConfig(AdapterConfig):
    """LN tuning: a trainable copy of each targeted normalisation layer.

    >>> LNTuningConfig(target_modules=["input_layernorm"]).method
    'ln_tuning'
    """

    peft_type: ClassVar[str] = "LN_TUNING"
    method: ClassVar[str] = "ln_tuning"


# ----------------------------------------------------------------------------- dispatch

#: PEFT's `peft_type` string -> config class.
PEFT_TYPES: Mapping[str, type[AdapterConfig]] = types.MappingProxyType(
    {c.peft_type: c for c in (LoraConfig, LoHaConfig, LoKrConfig, IA3Config, LNTuningConfig)}
)


def config_from_dict(d: Mapping[str, Any]) -> AdapterConfig:
    """Builds the right config class from a parsed `adapter_config.json`, by its `peft_type`.

    >>> config_from_dict({"peft_type": "LOKR", "r": 4}).r
    4
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"expected a dict parsed from adapter_config.json, got {d!r}.")
    peft_type = d.get("peft_type")
    cls = PEFT_TYPES.get(str(peft_type).upper()) if isinstance(peft_type, str) else None
    if cls is None:
        raise _fail("peft_type", peft_type, f"unsupported; peftjax reads {sorted(PEFT_TYPES)}.")
    return cls.from_dict(d)
