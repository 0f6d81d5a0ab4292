"""AdaLoRA, as HF PEFT 0.21 computes it (``peft/tuners/adalora/{config,layer,model}.py``).

One layer's arrays, Flax orientation (``in`` before ``out``) on the weight's matrix view (a
conv's ``in`` is ``in_channels * kh * kw``, PEFT's flattened Conv2d weight):

* ``lora_A (in, r)``, ``lora_E (r,)``, ``lora_B (r, out)``; PEFT's ParameterDict entries
  ``lora_A [r, in]``, ``lora_E [r, 1]``, ``lora_B [out, r]`` (file keys without ``.weight``).
  PEFT's ``ranknum`` is not stored: it is ``init_r`` for ever (also for pruned or reloaded
  modules), so the scale is ``c = alpha / (init_r + 1e-5)`` (``alpha <= 0``: ``r / (init_r +
  1e-5)``, PEFT's ``float(r)``).
* delta ``((A * e) @ B) * c``; forward ``y + ((x_d @ A) * (e * c)) @ B`` (dense) or
  ``y + conv(x_d, dW)`` (Conv2d, PEFT's ``conv2d(dropout(x), delta_w)``).

A *pruned* module (a PEFT file with a ``rank_pattern``, or `adalora_prune` after training) stores
only its kept triplets: ``r = sum(mask)`` rows, ``rank_pattern`` = the ``init_r`` bools that
`save_pretrained` writes back (``{"<module>.lora_E": [...]}``, PEFT's keys); rank 0 gives
zero-size arrays, as PEFT's files.

The rank allocator (PEFT's ``RankAllocator`` and ``AdaLoraModel.update_and_allocate``) is a set of
pure functions over the params tree and a state pytree, all jit-able with static shapes:

* `adalora_init_state(params)`: zero importance EMAs, every triplet kept;
* `adalora_update_and_allocate(params, grads, state, step)` -> ``(params, state, info)``: call it
  after each optimizer step with the post-step params and the gradients of that step (PEFT's
  documented order ``backward -> step -> update_and_allocate -> zero_grad``). ``step < T -
  tfinal``: importance EMAs of A, B and E, then masking to the cubic budget when the schedule
  says so; ``step == T - tfinal``: the final mask at ``target_r * n_modules`` (EMAs reset);
  ``step > T - tfinal``: E re-zeroed from the final mask;
* `adalora_orth_reg(params)`: PEFT's orthogonality regulariser R (add ``orth_reg_weight * R``
  to the loss; PEFT itself adds it only when the model has a ``task_type``);
* `adalora_rank_pattern(params, state)`: the pattern as PEFT's config holds it;
* `adalora_prune(params, state)`: the params with every module cut to its kept triplets and the
  pattern in its spec, which `save_pretrained` writes as PEFT does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .. import _torch_layout as L
from .._tree import rebuild, walk
from ..config import (
    AdapterConfig,
    FrozenDict,
    check_alpha,
    check_bool,
    check_dropout,
    check_rank,
    fail,
    is_int,
    is_real,
    pattern_field,
    unsupported,
)
from ..errors import (
    AdapterNameError,
    ConfigError,
    MergeError,
    ShapeError,
    TargetError,
    UnsupportedModuleError,
)
from ..node import is_adapted
from .base import IN, OUT, RANK, Spec, dropout, one_value, spec_fields

__all__ = [
    "API",
    "AdaLoraConfig",
    "AdaLoraSchedule",
    "AdaLoraSpec",
    "adalora_init_state",
    "adalora_orth_reg",
    "adalora_prune",
    "adalora_rank_pattern",
    "adalora_update_and_allocate",
]

_LORA = ("lora_A", "lora_B", "lora_E")
_E_SUFFIX = ".lora_E"


def _scaling(alpha: float, r: int, init_r: int) -> float:
    """PEFT's ``scaling / (ranknum + 1e-5)``: ``scaling = alpha`` (``float(r)`` if alpha <= 0,
    ``r`` the module's current rank) and ``ranknum = init_r``."""
    s = alpha if alpha > 0 else float(r)
    return s / (float(init_r) + 1e-5)


def _pattern_module(key: str) -> str | None:
    """The module path of a ``rank_pattern`` key: ``<path>.lora_E`` (PEFT's saved form) or
    ``<path>.lora_E.<adapter>`` (its live form); ``None`` for anything else."""
    if key.endswith(_E_SUFFIX):
        return key[: -len(_E_SUFFIX)] or None
    head, _, _ = key.rpartition(".")
    if head.endswith(_E_SUFFIX):
        return head[: -len(_E_SUFFIX)] or None
    return None


def _rank_pattern_field(v: Any, init_r: int) -> FrozenDict | None:
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise fail(
            "rank_pattern", v, "must be None or a dict {'<module>.lora_E': [bool] * init_r}."
        )
    out = {}
    for key, mask in v.items():
        if not isinstance(key, str) or _pattern_module(key) is None:
            raise fail(
                "rank_pattern",
                key,
                "AdaLoRA's keys are '<module path>.lora_E' (as PEFT saves them), e.g. "
                "'model.layers.0.self_attn.q_proj.lora_E'.",
            )
        if isinstance(mask, (str, bytes, Mapping)) or not isinstance(mask, (list, tuple)):
            raise fail(f"rank_pattern[{key!r}]", mask, "must be a list of init_r bools.")
        if not all(isinstance(b, (bool, np.bool_)) for b in mask):
            raise fail(f"rank_pattern[{key!r}]", mask, "every entry must be True or False.")
        if len(mask) != init_r:
            raise fail(
                f"rank_pattern[{key!r}]",
                list(mask),
                f"has {len(mask)} entries; AdaLoRA's masks have one per initial triplet "
                f"(init_r={init_r}).",
            )
        out[key] = tuple(bool(b) for b in mask)
    return FrozenDict(out)


def _init_weights_field(v: Any) -> bool | str:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() == "gaussian":
        return "gaussian"  # truthy: PEFT's AdaLoRA resets every truthy value the same way
    raise fail(
        "init_lora_weights",
        v,
        "AdaLoRA initialises with True (E = 0, A, B ~ N(0, 0.02^2)) or False (A, B, E ~ N(0, 1)).",
    )


def _non_negative_int(name: str, v: Any) -> int:
    if not is_int(v) or v < 0:
        raise fail(name, v, "must be a non-negative integer.")
    return v


# ------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class AdaLoraSchedule:
    """The rank allocator's fields of an `AdaLoraConfig` (PEFT's names), kept in each spec so
    that the allocator and `save_pretrained` find them in the params tree."""

    target_r: int = 8
    total_step: int = 1
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5


_SCHEDULE_FIELDS = tuple(f.name for f in dataclasses.fields(AdaLoraSchedule))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA, as HF PEFT's `AdaLoraConfig` (a `LoraConfig` subclass: LoRA's fields are here too).

    Modules start at rank `init_r`; the rank allocator (`adalora_update_and_allocate`) masks
    triplets to a cubic global budget that reaches `target_r` per module on average after
    `total_step - tfinal` steps. `r`, `use_rslora` and `alpha_pattern` are LoRA fields that
    AdaLoRA ignores, as PEFT does (`r` is saved as given, 8 by default). `rank_pattern` is the
    allocator's result, ``{"<module>.lora_E": [init_r bools]}``: a module it names has
    ``sum(mask)`` triplets (how PEFT loads a pruned adapter).

    Attributes:
      (shared: common)
      target_r: the average rank per module the allocator masks down to.
      init_r: every module's initial rank (the triplets ``lora_A``, ``lora_E``, ``lora_B``).
      tinit: warm-up steps before the first mask.
      tfinal: steps at the end with the final mask fixed (fine-tuning).
      deltaT: steps between two masks in the budgeting phase.
      beta1: the EMA factor of the importance (sensitivity) smoothing, in (0, 1).
      beta2: the EMA factor of the importance uncertainty, in (0, 1).
      orth_reg_weight: the weight of the orthogonal regulariser (`adalora_orth_reg`) in the loss, >=
        0.
      total_step: the total number of training steps (required, > ``tinit + tfinal``).
      rank_pattern: the allocator's result, ``{"<module>.lora_E": [init_r bools]}``: a module it
        names has ``sum(mask)`` triplets (how PEFT loads a pruned adapter); ``None``: every module
        at ``init_r``.
      r: a LoRA field AdaLoRA ignores, as PEFT does (saved as given); use ``init_r``.
      lora_alpha: the scale's numerator: ``scaling = lora_alpha / init_r`` (kept after pruning, as
        PEFT).
      lora_dropout: dropout probability on the adapter's input while training (when `pj.apply` gets
        an ``rng``).
      fan_in_fan_out: (shared)
      bias: PEFT's trainable biases: only ``"none"`` is supported (``"all"`` / ``"lora_only"`` raise
        `ConfigError`).
      use_rslora: a LoRA field AdaLoRA ignores, as PEFT does.
      init_lora_weights: ``True`` (or ``"gaussian"``): ``lora_E = 0`` and ``lora_A``, ``lora_B`` ~
        ``N(0, 0.02^2)`` (the adapter starts as a no-op); ``False``: all three ~ ``N(0, 1)`` (a
        non-zero delta).
      layers_to_transform: (shared)
      layers_pattern: (shared)
      alpha_pattern: a LoRA field AdaLoRA ignores, as PEFT does.
      use_dora: must be ``False``: AdaLoRA does not support DoRA (PEFT's rule).
      lora_bias: PEFT's trainable bias on ``lora_B``: only ``False`` is supported.
      layer_replication: PEFT's layer duplication: only ``None`` (or empty) is supported.
      target_parameters: PEFT's ``target_parameters``: only ``None`` (or empty) is supported.
      trainable_token_indices: PEFT's trainable embedding rows: only ``None`` (or empty) is
        supported.

    Example:

      >>> cfg = AdaLoraConfig(init_r=6, lora_alpha=8, total_step=100, target_modules=["fc1"])
      >>> round(cfg.scaling(6, 8), 6)
      1.333331
    """

    peft_type: ClassVar[str] = "ADALORA"
    method: ClassVar[str] = "adalora"
    max_trainable: ClassVar[int | None] = 1  # PEFT: "supports only 1 trainable adapter"
    alpha_field: ClassVar[str] = "lora_alpha"
    #: AdaLoRA's `rank_pattern` keys are ``<module>.lora_E``, not LoRA's module regexes, and
    #: PEFT ignores `alpha_pattern`: `inject` checks neither as LoRA patterns (`module_specs`
    #: checks the rank pattern's modules).
    PATTERN_FIELDS: ClassVar[tuple[str, ...]] = ()
    PEFT_IGNORED_FIELDS: ClassVar[Mapping[str, Any]] = FrozenDict(
        {
            **AdapterConfig.PEFT_IGNORED_FIELDS,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "eva_config": None,
            "corda_config": None,
            "lora_ga_config": None,
            "qalora_group_size": 16,
            "ensure_weight_tying": False,
        }
    )
    PEFT_UNSUPPORTED_FIELDS: ClassVar[Mapping[str, Any]] = FrozenDict(
        {
            "loftq_config": FrozenDict(),  # PEFT: "ADALORA does not support LOFTQ."
            "use_qalora": False,
            "alora_invocation_tokens": None,
            "velora_config": None,
            "monteclora_config": None,
            "use_bdlora": None,
            "arrow_config": None,
            "kasa_config": None,
        }
    )

    # AdaLoRA's own fields
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: FrozenDict[tuple[bool, ...]] | None = None
    # LoRA's fields, as PEFT's subclass has them
    r: int = 8
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    alpha_pattern: FrozenDict[int | float] = dataclasses.field(default_factory=FrozenDict)
    use_dora: bool = False
    lora_bias: bool = False
    layer_replication: None = None
    target_parameters: None = None
    trainable_token_indices: None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank("init_r", self.init_r)
        _non_negative_int("target_r", self.target_r)
        _non_negative_int("tinit", self.tinit)
        _non_negative_int("tfinal", self.tfinal)
        if not is_int(self.deltaT) or self.deltaT <= 0:
            raise fail("deltaT", self.deltaT, "the allocation interval must be an int > 0.")
        for name in ("beta1", "beta2"):
            if not is_real(getattr(self, name)):
                raise fail(name, getattr(self, name), "must be a finite number.")
        if not is_real(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise fail(
                "orth_reg_weight",
                self.orth_reg_weight,
                "should be greater than or equal to 0 (PEFT's rule).",
            )
        if self.total_step is None or not is_int(self.total_step) or self.total_step <= 0:
            raise fail(
                "total_step",
                self.total_step,
                "AdaLoRA needs the total number of training steps: supply an int > 0.",
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise fail(
                "tinit",
                self.tinit,
                f"with `tfinal`={self.tfinal} and `total_step`={self.total_step} the schedule has "
                "no budgeting phase (PEFT needs tinit < total_step - tfinal); decrease "
                "`tfinal` / `tinit` or increase `total_step`.",
            )
        if not is_int(self.r):
            raise fail("r", self.r, "must be an int (AdaLoRA ignores it; use `init_r`).")
        check_alpha("lora_alpha", self.lora_alpha)
        check_dropout("lora_dropout", self.lora_dropout)
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias"):
            check_bool(name, getattr(self, name))
        if self.use_dora:
            raise fail("use_dora", True, "AdaLoRA does not support DoRA (PEFT's rule).")
        if self.bias not in ("none", "all", "lora_only"):
            raise fail("bias", self.bias, "must be 'none', 'all' or 'lora_only'.")
        if self.bias != "none":
            raise unsupported("bias", self.bias, "none")
        if self.lora_bias:
            raise unsupported("lora_bias", self.lora_bias, False)
        for name in ("layer_replication", "target_parameters", "trainable_token_indices"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (list, tuple, dict)) and not value):
                raise unsupported(name, value, None)
            self._set(name, None)
        self._set("init_lora_weights", _init_weights_field(self.init_lora_weights))
        self._check_layers(str_targets_forbidden=True)
        self._set("rank_pattern", _rank_pattern_field(self.rank_pattern, self.init_r))
        self._set("alpha_pattern", pattern_field("alpha_pattern", self.alpha_pattern, check_alpha))

    # ---- hooks ---------------------------------------------------------------------------
    @property
    def schedule(self) -> AdaLoraSchedule:
        return AdaLoraSchedule(**{f: getattr(self, f) for f in _SCHEDULE_FIELDS})

    def mask_of(self, path: str) -> tuple[bool, ...] | None:
        """The `rank_pattern` mask of module ``path`` (``None``: not pruned, ``init_r``)."""
        for key, mask in (self.rank_pattern or {}).items():
            if _pattern_module(key) == path:
                return mask
        return None

    def rank_alpha(self, path: str) -> tuple[int, int | float]:
        mask = self.mask_of(path)
        return (self.init_r if mask is None else sum(mask)), self.lora_alpha

    def scaling(self, r: int, alpha: float) -> float:
        """PEFT's ``alpha / (ranknum + 1e-5)`` with ``ranknum = init_r`` whatever the rank."""
        return _scaling(alpha, r, self.init_r)

    def module_spec(self, path, layout, shape, mask):
        if layout.kind == "conv" and len(layout.spatial(shape)) != 2:
            raise UnsupportedModuleError(
                f"module `{path}`: AdaLoRA adapts Linear and Conv2d weights (PEFT's SVDLinear, "
                f"SVDConv2d); this conv kernel has shape {tuple(shape)}."
            )
        keep = self.mask_of(path)
        r = self.init_r if keep is None else sum(keep)
        return AdaLoraSpec(
            **spec_fields(layout, shape, mask, _scaling(self.lora_alpha, r, self.init_r)),
            r=r,
            init_r=self.init_r,
            lora_alpha=self.lora_alpha,
            rank_pattern=keep,
            lora_dropout=float(self.lora_dropout),
            init_weights=self.init_lora_weights,
            schedule=self.schedule,
        )

    def module_specs(self, items):
        paths = [path for path, _, _, _ in items]
        for key in self.rank_pattern or {}:
            if _pattern_module(key) not in paths:
                stacked = [p for p, lay, _, _ in items if lay is not None and lay.stack]
                raise TargetError(
                    f"`rank_pattern` key {key!r} names no targeted module (keys are "
                    f"'<module path>.lora_E'); targeted modules: {paths[:8]}"
                    + (
                        f". Stacked modules ({stacked[:3]}) cannot take a rank pattern: PEFT "
                        "has one module, with its own rank, per layer."
                        if stacked
                        else "."
                    )
                )
        return super().module_specs(items)

    def check_module(self, peft_path: str, spec) -> None:
        if spec.init_r != self.init_r:
            raise ConfigError(
                f"`config` has init_r={self.init_r} but module `{peft_path}` was made with "
                f"init_r={spec.init_r} (its scale is alpha / init_r)."
            )
        mask = self.mask_of(peft_path)
        if mask != spec.rank_pattern:
            raise ConfigError(
                f"`config`'s rank_pattern gives module `{peft_path}` the mask {mask}, but its "
                f"adapter has {spec.rank_pattern} ({spec.r} triplets)."
            )

    def narrowed_fields(self, peft_paths):
        pattern = {}
        for mod, pps in peft_paths.items():
            masks = [self.mask_of(pp) for pp in pps]
            if all(m is None for m in masks):
                continue
            if len(pps) != 1:
                raise ConfigError(
                    f"module `{mod}` is stacked ({len(pps)} PEFT modules) and `rank_pattern` "
                    "prunes some of them: a stacked adapter keeps every layer's init_r "
                    "triplets, so load a pruned AdaLoRA adapter into unstacked layers."
                )
            pattern[mod + _E_SUFFIX] = masks[0]
        # `_narrowed` rewrote r / lora_alpha / rank_pattern / alpha_pattern LoRA's way: undo it
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "rank_pattern": pattern or None,
            "alpha_pattern": self.alpha_pattern,
        }

    @classmethod
    def from_specs(cls, entries, common):
        pattern = {
            e.peft_path + _E_SUFFIX: list(e.spec.rank_pattern)
            for e in entries
            if e.spec.rank_pattern is not None
        }
        schedule = one_value(entries, "the AdaLoRA schedule", lambda s: s.schedule)
        return cls(
            **common,
            **dataclasses.asdict(schedule),
            init_r=one_value(entries, "init_r", lambda s: s.init_r),
            lora_alpha=one_value(entries, "lora_alpha", lambda s: s.lora_alpha),
            lora_dropout=one_value(entries, "lora_dropout", lambda s: s.lora_dropout),
            init_lora_weights=one_value(entries, "init_lora_weights", lambda s: s.init_weights),
            rank_pattern=pattern or None,
        )


# ------------------------------------------------------------------------------------ spec


@dataclasses.dataclass(frozen=True)
class AdaLoraSpec(Spec):
    """One module's AdaLoRA adapter: ``r`` stored triplets of the ``init_r`` it started with;
    ``rank_pattern``: the ``init_r`` bools of a pruned module (``None``: ``r == init_r``)."""

    r: int = 12
    init_r: int = 12
    lora_alpha: int | float = 8
    rank_pattern: tuple[bool, ...] | None = None
    lora_dropout: float = 0.0
    init_weights: bool | str = True
    schedule: AdaLoraSchedule = AdaLoraSchedule()

    method: ClassVar[str] = "adalora"

    def __post_init__(self):
        super().__post_init__()
        if self.rank_pattern is None:
            ok = self.r == self.init_r
        else:
            ok = len(self.rank_pattern) == self.init_r and sum(self.rank_pattern) == self.r
            if self.layout.stack:
                raise ShapeError(
                    "an AdaLoRA rank pattern on a stacked weight is not supported: PEFT has one "
                    "module, with its own rank, per layer."
                )
        if not ok or self.r < 0:
            raise ShapeError(
                f"AdaLoRA spec: r={self.r} does not fit init_r={self.init_r} and rank_pattern="
                f"{self.rank_pattern} (r is init_r, or the number of kept triplets)."
            )

    def describe(self) -> str:
        return f"adalora(r={self.r}, init_r={self.init_r})"

    def init_layer(self, key, w_layer, scale, dtype):
        fan_in, out = self.in_out
        r = self.r
        ka, ke, kb = jax.random.split(key, 3)
        a = jax.random.normal(ka, (fan_in, r), dtype)
        b = jax.random.normal(kb, (r, out), dtype)
        if self.init_weights:  # any truthy value: PEFT's reset_lora_parameters
            return {"lora_A": a * 0.02, "lora_E": jnp.zeros((r,), dtype), "lora_B": b * 0.02}
        return {"lora_A": a, "lora_E": jax.random.normal(ke, (r,), dtype), "lora_B": b}  # randn

    def sharding_roles(self):
        """As LoRA's: ``A (in, r)`` on the input sharding, ``B (r, out)`` on the output's, the
        singular values ``E (r,)`` replicated (rank axis)."""
        return {"lora_A": (IN, RANK), "lora_E": (RANK,), "lora_B": (RANK, OUT)}

    def delta_matrix(self, arrays, scale):
        a = arrays["lora_A"].astype(jnp.float32)
        e = arrays["lora_E"].astype(jnp.float32)
        return ((a * e[None, :]) @ arrays["lora_B"].astype(jnp.float32)) * scale

    def linear_forward(self, x2, y2, arrays, w2, scale, rng):
        a, e, b = arrays["lora_A"], arrays["lora_E"], arrays["lora_B"]
        xd = dropout(x2.astype(a.dtype), self.lora_dropout, rng)
        # the scale multiplies the rank-wide ``(x @ A) * e``, not the output
        out = ((xd @ a) * (e * scale.astype(e.dtype)).astype(a.dtype)) @ b
        acc = jnp.promote_types(y2.dtype, out.dtype)
        return (y2.astype(acc) + out).astype(y2.dtype)

    def file_rules(self):
        return {
            "lora_A": ("lora_A", L.TRANSPOSE),
            "lora_E": ("lora_E", L.COLUMN),
            "lora_B": ("lora_B", L.TRANSPOSE),
        }

    def fusable(self, training):
        return not (training and self.lora_dropout > 0)

    @property
    def conv_factored(self):
        return self.layout.kind == "conv"

    def conv_forward(self, conv, x, y, arrays, scale, rng, feature_axis):
        """PEFT's SVDConv2d: ``y + conv2d(dropout(x), dW)`` with the delta as a kernel."""
        a = arrays["lora_A"]
        dt = jnp.promote_types(x.dtype, a.dtype)
        xd = dropout(x.astype(dt), self.lora_dropout, rng)
        kernel = self.from_matrix(self.delta_matrix(arrays, scale)).astype(dt)
        t = conv(xd, kernel)
        acc = jnp.promote_types(y.dtype, t.dtype)
        return (y.astype(acc) + t).astype(y.dtype)


# ------------------------------------------------------------------------------------ allocator


@dataclasses.dataclass
class _Entry:
    index: int  # leaf index in `walk` order
    names: tuple[str, ...]  # key-path segments of the weight leaf
    module: str
    spec: AdaLoraSpec


def _adapter_name(leaves, name: str | None) -> str:
    ada: dict[str, Any] = {}
    for l in leaves:
        if is_adapted(l.value):
            for n, s in l.value.specs:
                if s.method == "adalora":
                    ada.setdefault(n, False)
                    ada[n] |= n not in l.value.frozen
    if name is not None:
        if not isinstance(name, str) or name not in ada:
            raise AdapterNameError(
                f"`name`: no AdaLoRA adapter named {name!r}; the AdaLoRA adapters are "
                f"{sorted(ada)}."
            )
        return name
    trainable = sorted(n for n, t in ada.items() if t)
    if len(ada) == 1:
        return next(iter(ada))
    if len(trainable) == 1:
        return trainable[0]
    if not ada:
        raise AdapterNameError("the params carry no AdaLoRA adapter (`pj.inject` one first).")
    raise AdapterNameError(
        f"the params carry AdaLoRA adapters {sorted(ada)}, {len(trainable)} of them trainable; "
        "PEFT trains one: pass `name=`."
    )


def _entries(params, name: str | None) -> tuple[str, list[_Entry], list, Any]:
    leaves, treedef = walk(params)
    name = _adapter_name(leaves, name)
    out = []
    for l in leaves:
        node = l.value
        if is_adapted(node) and name in node.names:
            out.append(_Entry(l.index, l.names, l.module, node.spec(name)))
    mods = [e.module for e in out]
    if len(set(mods)) != len(mods):  # pragma: no cover - one weight leaf per module
        raise ShapeError(f"AdaLoRA adapter {name!r}: two adapted leaves share a module path.")
    return name, out, leaves, treedef


def _flat(v, lead: int):
    """``v`` with its ``lead`` leading (layer) axes flattened into one (added when 0)."""
    return v.reshape((-1, *v.shape[lead:]))


def _lead(spec: AdaLoraSpec) -> int:
    """Number of leading layer axes of the stored arrays (stack axes, or 1 when compact)."""
    return 1 if spec.compact else spec.layout.stack


def _one_schedule(name: str, entries: list[_Entry]) -> AdaLoraSchedule:
    scheds = {e.spec.schedule for e in entries}
    if len(scheds) != 1:
        raise ConfigError(
            f"AdaLoRA adapter {name!r}: its modules disagree on the schedule "
            f"({sorted(map(repr, scheds))})."
        )
    return scheds.pop()


def _budgets(entries: list[_Entry]) -> tuple[int, int]:
    """``(init_bgt, target_bgt)``: PEFT's sum of ``lora_A`` rows and ``target_r * n_modules``
    (each stored layer slice of a stacked weight is one PEFT module)."""
    n = sum(len(e.spec.stored_layers) for e in entries)
    init = sum(e.spec.r * len(e.spec.stored_layers) for e in entries)
    return init, entries[0].spec.schedule.target_r * n


@functools.lru_cache(maxsize=32)
def _budget_table(init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total: int):
    """PEFT's ``budget_schedule(t)`` budget for ``t = 0 .. total - tfinal``, computed as PEFT does
    (Python floats, ``int()`` truncation), so a traced step indexes the exact values."""
    end = total - tfinal
    out = np.empty(end + 1, np.int32)
    for t in range(end + 1):
        if t <= tinit:
            out[t] = init_bgt
        else:
            mul_coeff = 1 - (t - tinit) / (total - tfinal - tinit)
            out[t] = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
    return out


def adalora_init_state(params, name: str | None = None) -> dict:
    """The rank allocator's initial state for AdaLoRA adapter ``name`` (default: the one
    trainable AdaLoRA adapter): zero importance EMAs and every triplet kept.

    The state is a pytree of arrays: ``{"ipt_avg": {module: {"lora_A", "lora_B", "lora_E"}},
    "ipt_unc": {...}, "keep": {module: bool (..., r)}, "has_pattern": bool}`` (``has_pattern``:
    a mask to a budget happened, i.e. PEFT's ``config.rank_pattern`` is set).

    Args:
      params: a tree carrying the AdaLoRA adapter.
      name: the AdaLoRA adapter (default: the only one, or the one trainable one).

    Returns:
      The allocator state (above) to pass to `adalora_update_and_allocate`.

    Raises:
      AdapterNameError: no AdaLoRA adapter ``name`` (or none, or several trainable ones and
        no ``name``).
      ConfigError: a schedule PEFT's allocator cannot run (``beta1`` / ``beta2`` not in
        (0, 1), a target budget above the initial one, modules that disagree on it).

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.AdaLoraConfig(init_r=4, target_r=2, total_step=4, tfinal=1,
      ...                        target_modules=["fc"], init_lora_weights=False)
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}}, cfg, key=0)
      >>> state = pj.adalora_init_state(p)
      >>> state["keep"]["fc"].tolist(), state["ipt_avg"]["fc"]["lora_A"].shape
      ([True, True, True, True], (4, 4))
    """
    name, entries, _, _ = _entries(params, name)
    sched = _one_schedule(name, entries)
    for f in ("beta1", "beta2"):
        b = getattr(sched, f)
        if not 0 < b < 1:
            raise fail(
                f, b, "the allocator's EMA factor must satisfy 0 < beta < 1 (PEFT asserts it)."
            )
    init_bgt, target_bgt = _budgets(entries)
    if target_bgt > init_bgt:
        raise fail(
            "target_r",
            sched.target_r,
            f"the target budget target_r * n_modules = {target_bgt} exceeds the initial one "
            f"({init_bgt} triplets): the allocator could not mask to it.",
        )
    leaves = walk(params)[0]
    avg, unc, keep = {}, {}, {}
    for e in entries:
        arrays = leaves[e.index].value.arrays[name]
        avg[e.module] = {k: jnp.zeros(arrays[k].shape, jnp.float32) for k in _LORA}
        unc[e.module] = {k: jnp.zeros(arrays[k].shape, jnp.float32) for k in _LORA}
        keep[e.module] = jnp.ones(arrays["lora_E"].shape, bool)
    return {"ipt_avg": avg, "ipt_unc": unc, "keep": keep, "has_pattern": jnp.asarray(False)}


def _grad_arrays(gnodes: dict, names: tuple[str, ...], name: str) -> dict:
    """The gradients of adapter ``name`` at the weight leaf ``names`` of the params."""
    node = gnodes.get(names)
    if node is None or not isinstance(node.arrays.get(name), dict):
        raise ShapeError(
            f"`grads` has no AdaLoRA gradients at `{'.'.join(names)}`: pass the gradients of "
            "the params (or of `pj.partition(params)[0]`), a tree with the same adapted nodes."
        )
    g = node.arrays[name]
    missing = [k for k in _LORA if g.get(k) is None]
    if missing:
        raise ShapeError(f"`grads` at `{'.'.join(names)}` lacks the gradients of {missing}.")
    return g


def adalora_update_and_allocate(params, grads, state: dict, step, name: str | None = None):
    """One ``AdaLoraModel.update_and_allocate(step)``: returns ``(params, state, info)``.

    Call it after the optimizer step with the updated params and the gradients of that step
    (PEFT's order: backward, step, update_and_allocate, zero_grad). ``grads``: the gradients of
    the params (or of the trainable half of `pj.partition`). ``step`` may be traced (the budget
    comes from a table of PEFT's exact values): the whole call is jit-able.

    With ``T = total_step`` and the schedule of the adapter's config:

    * ``step < T - tfinal``: for A, B and E, ``I = |p * g|``, ``avg <- beta1 avg + (1 - beta1)
      I``, ``unc <- beta2 unc + (1 - beta2) |I - avg|``; then, on a mask step (``tinit < step``,
      ``step % deltaT == 0``), every triplet whose score ``S_E[i] + mean_j S_A[j, i] + mean_k
      S_B[i, k]`` (``S = avg * unc``) is at most the ``(init_bgt - budget)``-th smallest of all
      modules' gets ``E[i] = 0`` (A and B are kept; masked entries may regrow until the next
      mask). The budget falls cubically from ``init_bgt`` to ``target_r * n_modules``.
    * ``step == T - tfinal``: no update; the final mask at the target budget; EMAs reset.
    * ``step > T - tfinal``: E re-zeroed from the last mask.

    ``info``: ``budget``, ``mask_ind`` (the schedule's), ``masked`` (E was masked this step),
    ``threshold`` (NaN unless masked to a budget), ``ranks`` ``{module: kept triplets}``. A
    budget equal to the initial one masks nothing (where PEFT's ``kthvalue(k=0)`` fails).

    Args:
      params: the params after the optimizer step, carrying the AdaLoRA adapter.
      grads: the gradients of that step: a tree with the same adapted nodes (the params' or
        the trainable half's gradients).
      state: the allocator state (`adalora_init_state`, then this function's).
      step: the training step (an int, or a traced int32 scalar).
      name: the AdaLoRA adapter (default: the only one, or the one trainable one).

    Returns:
      ``(params, state, info)``: params with ``E`` masked, the new state and ``info`` (above).

    Raises:
      AdapterNameError: no AdaLoRA adapter ``name`` (or no unique one).
      MergeError: the adapter is merged.
      ConfigError: modules that disagree on the schedule.
      ShapeError: a ``state`` that does not fit the params (e.g. from before
        `adalora_prune`), or ``grads`` without the adapter's gradients.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.AdaLoraConfig(init_r=4, target_r=2, total_step=4, tfinal=1,
      ...                        target_modules=["fc"], init_lora_weights=False)
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}}, cfg, key=0)
      >>> state = pj.adalora_init_state(p)
      >>> import jax
      >>> grads = p  # stand-in gradients with the params' structure (use ``jax.grad``)
      >>> update = jax.jit(pj.adalora_update_and_allocate)  # one compile, then fast
      >>> p, state, info = update(p, grads, state, 1)
      >>> int(info["budget"]), bool(info["masked"]), int(info["ranks"]["fc"])
      (2, True, 2)
    """
    name, entries, leaves, treedef = _entries(params, name)
    for e in entries:
        if name in leaves[e.index].value.merged:
            raise MergeError(
                f"adapter {name!r} is merged into `{e.module}`; unmerge it before allocating."
            )
    sched = _one_schedule(name, entries)
    init_bgt, target_bgt = _budgets(entries)
    T, tfinal, tinit = sched.total_step, sched.tfinal, sched.tinit
    end = T - tfinal
    keep_of = state.get("keep", {}) if isinstance(state, Mapping) else {}
    missing = [
        e.module
        for e in entries
        if e.module not in keep_of
        or tuple(keep_of[e.module].shape)
        != tuple(leaves[e.index].value.arrays[name]["lora_E"].shape)
    ]
    if missing:
        raise ShapeError(
            f"`state` does not fit module(s) {missing[:5]} (no entry, or another rank: a state "
            "from before `pj.adalora_prune`?): make it with `pj.adalora_init_state(params)` "
            "for these params."
        )
    t = jnp.asarray(step, jnp.int32)
    table = jnp.asarray(_budget_table(init_bgt, target_bgt, tinit, tfinal, T))
    upd, final, after = t < end, t == end, t > end
    budget = jnp.where(after, target_bgt, table[jnp.clip(t, 0, end)])
    mask_ind = jnp.where(t <= tinit, False, jnp.where(after, True, t % sched.deltaT == 0))
    do_mask = (upd & mask_ind) | final

    b1, b2 = sched.beta1, sched.beta2
    gnodes = {l.names: l.value for l in walk(grads)[0] if is_adapted(l.value)}
    avg: dict[str, dict[str, Any]] = {}
    unc: dict[str, dict[str, Any]] = {}
    scores: dict[str, Any] = {}
    arrays_of: dict[str, Any] = {}
    for e in entries:
        arrays = leaves[e.index].value.arrays[name]
        g = _grad_arrays(gnodes, e.names, name)
        arrays_of[e.module] = arrays
        avg[e.module], unc[e.module] = {}, {}
        for k in _LORA:
            p32 = arrays[k].astype(jnp.float32)
            ipt = jnp.abs(p32 * jnp.asarray(g[k], jnp.float32))
            a0, u0 = state["ipt_avg"][e.module][k], state["ipt_unc"][e.module][k]
            a1 = b1 * a0 + (1 - b1) * ipt
            u1 = b2 * u0 + (1 - b2) * jnp.abs(ipt - a1)
            avg[e.module][k] = jnp.where(upd, a1, a0)
            unc[e.module][k] = jnp.where(upd, u1, u0)
        lead = _lead(e.spec)
        s = {k: _flat(avg[e.module][k] * unc[e.module][k], lead) for k in _LORA}
        s_a = jnp.mean(s["lora_A"], axis=1)  # (n, r): PEFT's mean over A's input features
        s_b = jnp.mean(s["lora_B"], axis=2)  # (n, r): over B's output features
        scores[e.module] = s["lora_E"] + (s_a + s_b)

    every = jnp.concatenate([scores[e.module].reshape(-1) for e in entries])
    n_masked = init_bgt - budget  # PEFT's kthvalue(k=...)
    ordered = jnp.sort(every)
    last = max(every.shape[0] - 1, 0)
    kth = ordered[jnp.clip(n_masked - 1, 0, last)] if every.shape[0] else 0.0
    thr = jnp.where(n_masked >= 1, kth, -jnp.inf).astype(jnp.float32)

    new_state: dict[str, Any] = {"ipt_avg": {}, "ipt_unc": {}, "keep": {}, "has_pattern": None}
    out_leaves = list(leaves)
    ranks = {}
    for e in entries:
        arrays = arrays_of[e.module]
        shape_e = arrays["lora_E"].shape
        masked = (scores[e.module] <= thr).reshape(shape_e)
        keep0 = state["keep"][e.module]
        keep = jnp.where(do_mask, ~masked, keep0)
        zero = (do_mask & masked) | (after & ~keep)
        new_e = jnp.where(zero, jnp.zeros_like(arrays["lora_E"]), arrays["lora_E"])
        node = leaves[e.index].value
        node = node.replace(arrays={**node.arrays, name: {**arrays, "lora_E": new_e}})
        out_leaves[e.index] = dataclasses.replace(leaves[e.index], value=node)
        reset = lambda v: jnp.where(final, jnp.zeros_like(v), v)  # noqa: E731
        new_state["ipt_avg"][e.module] = {k: reset(v) for k, v in avg[e.module].items()}
        new_state["ipt_unc"][e.module] = {k: reset(v) for k, v in unc[e.module].items()}
        new_state["keep"][e.module] = keep
        ranks[e.module] = jnp.sum(keep, axis=-1)
    has = jnp.asarray(state["has_pattern"]) | do_mask
    new_state["has_pattern"] = has
    info = {
        "budget": budget,
        "mask_ind": mask_ind,
        "masked": do_mask | (after & has),
        "threshold": jnp.where(do_mask, thr, jnp.nan),
        "ranks": ranks,
    }
    return rebuild(treedef, out_leaves), new_state, info


def _safe_norm(m):
    """Frobenius norm over the last two axes, with a finite gradient at 0."""
    sq = jnp.sum(jnp.square(m), axis=(-2, -1))
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def adalora_orth_reg(params, name: str | None = None):
    """PEFT's orthogonal regulariser of AdaLoRA adapter ``name`` (default: the one trainable
    AdaLoRA adapter): the mean over every module's (every layer's) ``lora_A`` and ``lora_B`` of
    ``||P P^T - I_r||_F`` (PEFT's ``A A^T`` of ``A [r, in]``, ``B^T B`` of ``B [out, r]``; the
    norm is **not** squared); a rank-0 module counts with 0. Differentiable.

    PEFT adds ``orth_reg_weight * R`` to the loss (only for a model with a ``task_type``:
    ``PeftModel`` with ``task_type=None`` never does); add it to yours the same way.

    Args:
      params: a tree carrying the AdaLoRA adapter.
      name: the AdaLoRA adapter (default: the only one, or the one trainable one).

    Returns:
      ``R``, a float32 scalar (traceable and differentiable).

    Raises:
      AdapterNameError: no AdaLoRA adapter ``name`` (or no unique one).

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.AdaLoraConfig(init_r=4, total_step=10, target_modules=["fc"])
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}}, cfg, key=0)
      >>> reg = jax.jit(pj.adalora_orth_reg)
      >>> round(float(reg(p)), 1)  # near-zero A, B: ||0 - I_4||_F = 2
      2.0
    """
    name, entries, leaves, _ = _entries(params, name)
    total, count = jnp.float32(0.0), 0
    for e in entries:
        arrays = leaves[e.index].value.arrays[name]
        lead = _lead(e.spec)
        a = _flat(arrays["lora_A"], lead).astype(jnp.float32)  # (n, in, r)
        b = _flat(arrays["lora_B"], lead).astype(jnp.float32)  # (n, r, out)
        eye = jnp.eye(e.spec.r, dtype=jnp.float32)
        cov_a = jnp.einsum("nir,nis->nrs", a, a)
        cov_b = jnp.einsum("nro,nso->nrs", b, b)
        total = total + jnp.sum(_safe_norm(cov_a - eye)) + jnp.sum(_safe_norm(cov_b - eye))
        count += 2 * a.shape[0]
    return total / count if count else total


def _concrete(x, what: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except jax.errors.ConcretizationTypeError:
        raise ShapeError(f"{what} needs concrete values: call it outside `jax.jit`.") from None


def adalora_rank_pattern(params, state: dict, name: str | None = None, key_map=None):
    """The allocator's current rank pattern as PEFT's config holds it: ``{"<PEFT module
    path>.lora_E": [init_r bools]}`` (``key_map`` as `save_pretrained`'s; a stacked weight gives
    one key per layer), or ``None`` before the first mask (PEFT's ``rank_pattern=None``).
    Concrete values only (outside ``jit``).

    Args:
      params: a tree carrying the AdaLoRA adapter.
      state: the allocator state (`adalora_update_and_allocate`).
      name: the AdaLoRA adapter (default: the only one, or the one trainable one).
      key_map: ``(module_path[, layer]) -> PEFT module path``; default `stacked_key_map()`.

    Returns:
      ``{"<PEFT module path>.lora_E": [bool, ...]}``, or ``None`` before the first mask.

    Raises:
      AdapterNameError: no AdaLoRA adapter ``name`` (or no unique one).
      ShapeError: called under ``jit`` (the state is traced).

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.AdaLoraConfig(init_r=4, target_r=2, total_step=4, tfinal=1,
      ...                        target_modules=["fc"], init_lora_weights=False)
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}}, cfg, key=0)
      >>> state = {**pj.adalora_init_state(p), "has_pattern": jnp.asarray(True),
      ...          "keep": {"fc": jnp.array([True, False, True, False])}}
      >>> pj.adalora_rank_pattern(p, state)
      {'fc.lora_E': [True, False, True, False]}
    """
    from .._peft_keys import map_key, stacked_key_map

    key_map = key_map or stacked_key_map()
    name, entries, _, _ = _entries(params, name)
    if not bool(_concrete(state["has_pattern"], "`adalora_rank_pattern`")):
        return None
    out = {}
    for e in entries:
        keep = _concrete(state["keep"][e.module], "`adalora_rank_pattern`")
        flat = keep.reshape(-1, keep.shape[-1])
        layers = [None] if not e.spec.layout.stack else list(e.spec.stored_layers)
        for i, row in zip(layers, flat):
            out[map_key(key_map, e.module, i) + _E_SUFFIX] = _full_mask(e.spec, row)
    return out


def _full_mask(spec: AdaLoraSpec, keep_rows) -> list[bool]:
    """``keep_rows`` (one bool per stored triplet) as a mask over the ``init_r`` initial ones."""
    keep_rows = [bool(v) for v in keep_rows]
    if spec.rank_pattern is None:
        return keep_rows
    it = iter(keep_rows)
    return [bool(m) and next(it) for m in spec.rank_pattern]


def adalora_prune(params, state: dict, name: str | None = None):
    """``params`` with every module of AdaLoRA adapter ``name`` cut to the triplets the
    allocator keeps (``A[:, m]``, ``E[m]``, ``B[m, :]``) and the mask recorded in its spec:
    what PEFT's ``save_pretrained`` writes after training (sliced tensors, ``rank_pattern``) and
    what its ``from_pretrained`` rebuilds, so `save_pretrained` then writes PEFT's files. The
    scale stays ``alpha / init_r``. Before the first mask (no pattern yet) ``params`` is returned
    as it is, as PEFT saves it then. Outside ``jit`` only (the shapes change).

    Args:
      params: a tree carrying the AdaLoRA adapter (never modified).
      state: the allocator state (`adalora_update_and_allocate`).
      name: the AdaLoRA adapter (default: the only one, or the one trainable one).

    Returns:
      A new tree whose AdaLoRA modules hold only the kept triplets.

    Raises:
      AdapterNameError: no AdaLoRA adapter ``name`` (or no unique one).
      ShapeError: called under ``jit``; a stacked (scanned) weight, whose layers cannot hold
        ranks of their own.

    Example:

      >>> import jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.AdaLoraConfig(init_r=4, target_r=2, total_step=4, tfinal=1,
      ...                        target_modules=["fc"], init_lora_weights=False)
      >>> p = pj.inject({"fc": {"kernel": jnp.ones((4, 3))}}, cfg, key=0)
      >>> state = {**pj.adalora_init_state(p), "has_pattern": jnp.asarray(True),
      ...          "keep": {"fc": jnp.array([True, False, True, False])}}
      >>> w = pj.adalora_prune(p, state)["fc"]["kernel"]
      >>> w.spec("default").r, w.arrays["default"]["lora_A"].shape
      (2, (4, 2))
    """
    name, entries, leaves, treedef = _entries(params, name)
    if not bool(_concrete(state["has_pattern"], "`adalora_prune`")):
        return rebuild(treedef, leaves)
    out = list(leaves)
    for e in entries:
        spec = e.spec
        keep = _concrete(state["keep"][e.module], "`adalora_prune`")
        if spec.layout.stack:
            raise ShapeError(
                f"module `{e.module}` is a stacked weight: AdaLoRA rank patterns are per PEFT "
                "module (per layer, each with its own rank), which one stacked adapter cannot "
                "hold; train with unstacked layers to prune and save."
            )
        node = leaves[e.index].value
        arrays = node.arrays[name]
        idx = np.nonzero(keep)[0]
        mask = tuple(_full_mask(spec, keep))
        r = int(len(idx))
        new_spec = dataclasses.replace(
            spec,
            r=r,
            rank_pattern=mask,
            scaling=tuple(
                _scaling(spec.lora_alpha, r, spec.init_r) if s != 0 else 0.0 for s in spec.scaling
            ),
        )
        new_arrays = {
            **arrays,
            "lora_A": jnp.asarray(arrays["lora_A"])[:, idx],
            "lora_E": jnp.asarray(arrays["lora_E"])[idx],
            "lora_B": jnp.asarray(arrays["lora_B"])[idx, :],
        }
        specs = tuple((n, new_spec if n == name else s) for n, s in node.specs)
        node = node.replace(arrays={**node.arrays, name: new_arrays}, specs=specs)
        out[e.index] = dataclasses.replace(leaves[e.index], value=node)
    from ..sharding import place  # (peftjax.sharding imports the methods)

    return place(rebuild(treedef, out))  # the pruned arrays stay on the rule's shardings


#: The functions `peftjax` exports by name (the registry row's ``api``).
API: dict[str, Callable[..., Any]] = {
    "adalora_init_state": adalora_init_state,
    "adalora_update_and_allocate": adalora_update_and_allocate,
    "adalora_orth_reg": adalora_orth_reg,
    "adalora_rank_pattern": adalora_rank_pattern,
    "adalora_prune": adalora_prune,
}
