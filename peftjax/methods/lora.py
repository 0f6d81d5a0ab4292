"""LoRA and DoRA, as HF PEFT 0.21 computes them (``peft/tuners/lora/layer.py``, ``dora.py``).

Arrays of one layer, Flax orientation (``in`` before ``out``):

* dense: ``lora_A (in, r)``, ``lora_B (r, out)`` on the matrix view (PEFT: ``lora_A.weight.T``,
  ``lora_B.weight.T``); delta ``scale * A @ B``.
* conv: ``lora_A (*spatial, in, r)`` (a Flax conv kernel, same kernel size as the base),
  ``lora_B (r, out)`` (PEFT's 1x1 conv); delta ``scale * A_mat @ B`` on the conv matrix view.
* embed: ``lora_A (vocab, r)``, ``lora_B (r, features)`` (PEFT: ``lora_embedding_A.T``,
  ``lora_embedding_B.T``).
* DoRA adds ``lora_magnitude_vector (out,)``. With ``W`` the matrix view ``(in, out)`` and
  ``dW = scale * A @ B``: merge ``W' = m / ||W + dW||_in * (W + dW)``; forward
  ``y = xW + (g - 1) * x_d W + g * scale * x_d A B`` with ``g = m / stop_gradient(||W + dW||_in)``
  (column norms over the input axis, PEFT's row norms of the torch ``(out, in)`` weight).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .. import _torch_layout as L
from ..config import (
    AdapterConfig,
    FrozenDict,
    check_alpha,
    check_bool,
    check_dropout,
    check_rank,
    fail,
    pattern_field,
    str_seq,
    unsupported,
)
from ..errors import ConfigError, ShapeError
from ..layout import Layout
from ._combine import (
    FACTOR_WISE,
    UNPRUNED,
    CombineCall,
    first_spec,
    flat_layers,
    merge_tensors,
    rule_of,
    store,
    weight_table,
)
from .base import (
    IN,
    OUT,
    RANK,
    RankedConfig,
    Spec,
    dropout,
    kaiming_uniform,
    one_value,
    ranked_fields,
    spec_fields,
)

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
            raise fail(
                "init_lora_weights",
                v,
                "this initialisation is not supported by peftjax; "
                f"use one of {list(_LORA_INITS_SUPPORTED)}.",
            )
    raise fail("init_lora_weights", v, f"unknown value; use one of {list(_LORA_INITS_SUPPORTED)}.")


def _target_parameters(v: Any) -> tuple[str, ...] | None:
    """PEFT's ``target_parameters``: ``None`` or a list of parameter paths (order kept, the
    first occurrence of a repeated path; an empty list means none)."""
    if v is None:
        return None
    if isinstance(v, str):
        raise fail("target_parameters", v, "must be a list of strings or None (not a str).")
    names = tuple(dict.fromkeys(str_seq("target_parameters", v)))
    for n in names:
        if not n or n.startswith(".") or n.endswith(".") or ".." in n:
            raise fail("target_parameters", v, f"entry {n!r} is not a dotted parameter path.")
    return names or None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(RankedConfig, AdapterConfig):
    """LoRA (and DoRA with `use_dora=True`), as HF PEFT's `LoraConfig`.

    `scaling = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; `rank_pattern` and
    `alpha_pattern` override r and alpha per module.

    Attributes:
      (shared: common)
      r: the rank of ``lora_A`` / ``lora_B`` (``rank_pattern`` overrides it per module).
      lora_alpha: the scale's numerator: ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
        ``use_rslora``).
      lora_dropout: dropout probability on the adapter's input while training (when `pj.apply` gets
        an ``rng``).
      fan_in_fan_out: (shared)
      bias: PEFT's trainable biases: only ``"none"`` is supported (``"all"`` / ``"lora_only"`` raise
        `ConfigError`).
      use_rslora: rank-stabilised LoRA: ``scaling = lora_alpha / sqrt(r)``.
      init_lora_weights: ``True`` (kaiming-uniform ``lora_A``, zero ``lora_B``: the adapter starts
        as a no-op), ``"gaussian"`` (normal ``lora_A``, zero ``lora_B``) or ``False`` (both random:
        a non-zero delta, for tests). PEFT's other initialisations (``"pissa"``, ``"olora"``,
        ``"loftq"``, ``"eva"``, ``"corda"``...) raise `ConfigError`.
      layers_to_transform: (shared)
      layers_pattern: (shared)
      rank_pattern: (shared)
      alpha_pattern: ``{module regex: alpha}`` overriding ``lora_alpha`` likewise.
      use_dora: DoRA (weight-decomposed LoRA): adds a trainable ``lora_magnitude_vector`` per
        module.
      lora_bias: PEFT's trainable bias on ``lora_B``: only ``False`` is supported.
      layer_replication: PEFT's layer duplication: only ``None`` (or empty) is supported.
      trainable_token_indices: PEFT's trainable embedding rows: only ``None`` (or empty) is
        supported.
      target_parameters: PEFT's ``target_parameters``: dotted paths of parameters adapted directly
        (``lora.ParamWrapper``), e.g. the ``(experts, in, out)`` kernels of a mixture of experts
        (see ``parameter_spec``); with ``target_modules=[]`` only these are adapted. Not allowed
        with ``lora_dropout``, ``use_dora`` or ``fan_in_fan_out``.

    Example:

      >>> cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
      >>> cfg.scaling(cfg.r, cfg.lora_alpha)
      2.0
      >>> LoraConfig(r=4, lora_alpha=8, use_rslora=True).scaling(4, 8)  # 8 / sqrt(4)
      4.0
      >>> cfg.target_modules  # PEFT's set of names, stored sorted
      ('q_proj', 'v_proj')
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
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    rank_pattern: FrozenDict[int] = dataclasses.field(default_factory=FrozenDict)
    alpha_pattern: FrozenDict[int | float] = dataclasses.field(default_factory=FrozenDict)
    use_dora: bool = False
    # PEFT fields that change the math; only their defaults are supported.
    lora_bias: bool = False
    layer_replication: None = None
    trainable_token_indices: None = None
    # PEFT's ``target_parameters``: parameters adapted directly (``lora.ParamWrapper``), e.g.
    # the ``(experts, in, out)`` kernels of a mixture of experts; `parameter_spec`. (Documented
    # in the class's Attributes; a ``#:`` comment would document it a second time in autodoc.)
    target_parameters: Sequence[str] | None = None

    def __post_init__(self) -> None:
        self._set("target_parameters", _target_parameters(self.target_parameters))
        # PEFT's `target_modules=[]` with `target_parameters`: no module, only the parameters
        # (kept as `()`: `None` would make PEFT fill in its per-architecture default targets).
        no_modules = (
            self.target_parameters is not None
            and isinstance(self.target_modules, (list, tuple, set, frozenset))
            and not self.target_modules
        )
        if no_modules:
            self._set("target_modules", None)
        super().__post_init__()
        if no_modules:
            self._set("target_modules", ())
        check_rank("r", self.r)
        check_alpha("lora_alpha", self.lora_alpha)
        check_dropout("lora_dropout", self.lora_dropout)
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias"):
            check_bool(name, getattr(self, name))
        if self.bias not in ("none", "all", "lora_only"):
            raise fail("bias", self.bias, "must be 'none', 'all' or 'lora_only'.")
        if self.bias != "none":
            raise unsupported("bias", self.bias, "none")
        if self.lora_bias:
            raise unsupported("lora_bias", self.lora_bias, False)
        if self.target_parameters is not None:
            # PEFT's `lora.ParamWrapper` refuses these (it raises when it wraps a parameter)
            for name, ok in (
                ("lora_dropout", self.lora_dropout == 0),
                ("use_dora", not self.use_dora),
                ("fan_in_fan_out", not self.fan_in_fan_out),
            ):
                if not ok:
                    raise fail(
                        name,
                        getattr(self, name),
                        "PEFT's `target_parameters` (lora.ParamWrapper) does not work with it.",
                    )
        for name in ("layer_replication", "trainable_token_indices"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (list, tuple, dict)) and not value):
                raise unsupported(name, value, None)
            self._set(name, None)
        self._set("init_lora_weights", _lora_init(self.init_lora_weights))
        self._check_layers(str_targets_forbidden=True)
        self._set("rank_pattern", pattern_field("rank_pattern", self.rank_pattern, check_rank))
        self._set("alpha_pattern", pattern_field("alpha_pattern", self.alpha_pattern, check_alpha))

    def scaling(self, r: int, alpha: float) -> float:
        """PEFT's LoRA scale: `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`."""
        check_rank("r", r)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    alpha_field: ClassVar[str] = "lora_alpha"

    @property
    def method_label(self) -> str:
        return "dora" if self.use_dora else "lora"

    def module_spec(self, path, layout, shape, mask):
        r, s = self.module_scale(path)
        return LoraSpec(
            **spec_fields(layout, shape, mask, s),
            r=r,
            use_dora=self.use_dora,
            lora_dropout=float(self.lora_dropout),
            init_weights=self.init_lora_weights,
        )

    def parameter_spec(self, param, nest, layout, shape):
        """LoRA on a parameter targeted by `target_parameters` (PEFT's ``lora.ParamWrapper``):
        rank and alpha from ``rank_pattern`` / ``alpha_pattern`` matched on the parameter path
        (PEFT's ``current_key``); a 3-D ``(experts, in, out)`` weight has one ``(in, r)`` /
        ``(r, out)`` pair per expert (``layout.stack == 1``)."""
        r, s = self.module_scale(param)
        return LoraSpec(
            **spec_fields(layout, shape, None, s),
            r=r,
            init_weights=self.init_lora_weights,
            target_parameter=param,
            nest=int(nest),
        )

    @staticmethod
    def lora_spec_like(spec: Spec, r: int) -> LoraSpec:
        """A plain LoRA spec of rank ``r`` on the weight ``spec`` adapts, with scale 1 on its
        active layers (PEFT's ``convert_to_lora``: ``lora_alpha = r``, the scale baked into
        the factors); `peftjax.convert_to_lora` fills its arrays."""
        return LoraSpec(
            layout=spec.layout,
            shape=spec.shape,
            scaling=tuple(1.0 if s != 0 else 0.0 for s in spec.scaling),
            layers=spec.layers,
            carries_base=spec.carries_base,
            r=int(r),
        )

    @classmethod
    def from_specs(cls, entries, common):
        # entries on targeted parameters carry their PEFT parameter path: they are listed in
        # `target_parameters` (innermost wrapper of each module first, so that injecting with
        # the written config nests them the same way), not in `target_modules`
        params = [e for e in entries if e.spec.target_parameter is not None]
        if params:
            names = {e.peft_path for e in params}
            common = dict(common)
            common["target_modules"] = [m for m in common["target_modules"] if m not in names]
            order = sorted(params, key=lambda e: (-e.spec.nest, e.peft_path))
            common["target_parameters"] = list(dict.fromkeys(e.peft_path for e in order))
        return cls(
            **common,
            **ranked_fields(entries, "lora_alpha", try_rslora=True),
            use_dora=one_value(entries, "use_dora", lambda s: s.use_dora),
            lora_dropout=one_value(entries, "lora_dropout", lambda s: s.lora_dropout),
            init_lora_weights=one_value(entries, "init_lora_weights", lambda s: s.init_weights),
        )


@dataclasses.dataclass(frozen=True)
class LoraSpec(Spec):
    """LoRA on one weight. On a parameter targeted by PEFT's ``target_parameters``,
    ``target_parameter`` is its PEFT parameter path and ``nest`` the number of other targeted
    parameters of the same module that PEFT wraps around it (its file keys get ``nest`` times
    ``.base_layer``); a 3-D weight is ``(experts, in, out)`` (``layout.stack == 1``), one LoRA
    pair per expert, stored in PEFT's ``ParamWrapper`` layout (`_ExpertRule`)."""

    r: int = 8
    use_dora: bool = False
    lora_dropout: float = 0.0
    hotswap: ClassVar[bool] = True
    init_weights: bool | str = True
    target_parameter: str | None = None
    nest: int = 0

    method: ClassVar[str] = "lora"
    buffers: ClassVar[frozenset[str]] = frozenset({"weight_norm"})  # DoRA's merge-time norm
    # DoRA on an excluded (scale 0) slice: ``g = m / norm`` is finite, then discarded
    identity: ClassVar[dict[str, float]] = {"lora_magnitude_vector": 1.0, "weight_norm": 1.0}

    @property
    def needs_base_output(self) -> bool:  # type: ignore[override]
        return self.use_dora

    def describe(self) -> str:
        if self.target_parameter is not None and self.layout.stack:
            return f"lora(r={self.r}, experts={self.n_layers})"
        return f"{'dora' if self.use_dora else 'lora'}(r={self.r})"

    @property
    def supports_lora_conversion(self) -> bool:
        # PEFT: lora.Linear (its DoRA variant too, whose `get_delta_weight` then drops the
        # magnitude: peftjax refuses DoRA, whose change of W is not `scale * A @ B`); not
        # embeddings, convs or `target_parameters` (lora.ParamWrapper)
        return self.layout.kind == "dense" and not self.use_dora and self.target_parameter is None

    def file_parameter(self):
        return None if self.target_parameter is None else (self.target_parameter, self.nest)

    # ---- init -------------------------------------------------------------------------------
    def init_layer(self, key, w_layer, scale, dtype):
        lay, r = self.layout, self.r
        fan_in, out = self.in_out
        ka, kb = jax.random.split(key)
        if lay.kind == "embed":
            # PEFT: A = 0, B ~ N(0, 1) for True/"gaussian"; both N(0, 1) for False.
            a = (
                jax.random.normal(ka, (fan_in, r), dtype)
                if self.init_weights is False
                else jnp.zeros((fan_in, r), dtype)
            )
            b = jax.random.normal(kb, (r, out), dtype)
        else:
            a_shape = (
                (*lay.spatial(self.shape), self.shape[-2], r) if lay.kind == "conv" else (fan_in, r)
            )
            if self.init_weights == "gaussian":
                a = jax.random.normal(ka, a_shape, dtype) / r
            else:
                a = kaiming_uniform(ka, a_shape, fan_in, dtype)
            if self.init_weights is False:
                # PEFT's lora_B is a Linear(r * experts, out) on a targeted expert parameter
                fan = r * self.n_layers if self.target_parameter is not None else r
                b = kaiming_uniform(kb, (r, out), fan, dtype)
            else:
                b = jnp.zeros((r, out), dtype)
        arrays = {"lora_A": a, "lora_B": b}
        if self.use_dora:
            w = self.to_matrix(w_layer) + self.delta_matrix(arrays, scale)
            arrays["lora_magnitude_vector"] = _col_norm(w).astype(dtype)
        return arrays

    # ---- mesh -------------------------------------------------------------------------------
    def sharding_roles(self):
        """``A (in, r)`` takes the kernel's input sharding, ``B (r, out)`` its output sharding, the
        rank replicated; a conv ``A (*spatial, in, r)`` keeps the kernel's spatial and input axes;
        DoRA's magnitude and merge-time norm (one per output) follow the output axis."""
        nsp = len(self.layout.spatial(self.shape))
        a = (*range(nsp + 1), RANK) if self.layout.kind == "conv" else (IN, RANK)
        return {
            "lora_A": a,
            "lora_B": (RANK, OUT),
            "lora_magnitude_vector": (OUT,),
            "weight_norm": (OUT,),
        }

    # ---- math -------------------------------------------------------------------------------
    def a_matrix(self, a):
        if self.layout.kind == "conv":
            return Layout("conv").to_matrix(a)
        return a

    def delta_matrix(self, arrays, scale):
        a = self.a_matrix(arrays["lora_A"]).astype(jnp.float32)
        return (a @ arrays["lora_B"].astype(jnp.float32)) * scale

    def merge_layer(self, w32, arrays, scale):
        if not self.use_dora:
            return super().merge_layer(w32, arrays, scale)
        w = self.to_matrix(w32) + self.delta_matrix(arrays, scale)
        norm = _col_norm(w)
        g = arrays["lora_magnitude_vector"].astype(jnp.float32) / norm
        on = scale != 0
        merged = jnp.where(on, w * g[None, :], self.to_matrix(w32))
        return self.from_matrix(merged), {**arrays, "weight_norm": norm}

    def unmerge_layer(self, w32, arrays, scale):
        if not self.use_dora:
            return super().unmerge_layer(w32, arrays, scale)
        arrays = dict(arrays)
        norm = arrays.pop("weight_norm")
        g = arrays["lora_magnitude_vector"].astype(jnp.float32) / norm
        w = self.to_matrix(w32)
        orig = w / g[None, :] - self.delta_matrix(arrays, scale)
        return self.from_matrix(jnp.where(scale != 0, orig, w)), arrays

    def linear_forward(self, x2, y2, arrays, w2, scale, rng):
        a, b = self.a_matrix(arrays["lora_A"]), arrays["lora_B"]
        xd = dropout(x2.astype(a.dtype), self.lora_dropout, rng)
        if not self.use_dora:
            # the scale multiplies the rank-wide ``x @ A`` (tokens x r), not the output
            lora = ((xd @ a) * scale.astype(a.dtype)) @ b
            acc = jnp.promote_types(y2.dtype, lora.dtype)
            return (y2.astype(acc) + lora).astype(y2.dtype)
        lora = (xd @ a) @ b
        acc = jnp.promote_types(y2.dtype, lora.dtype)
        norm = jax.lax.stop_gradient(_factored_col_norm(w2, a, b, scale))
        g = arrays["lora_magnitude_vector"] / norm
        base_d = y2 if rng is None or self.lora_dropout == 0.0 else xd @ w2.astype(xd.dtype)
        y = y2.astype(acc) + (g - 1) * base_d.astype(acc) + g * lora * scale
        return jnp.where(scale != 0, y, y2.astype(acc)).astype(y2.dtype)

    # ---- mixed-adapter batches ------------------------------------------------------------
    mixed_free: ClassVar[frozenset[str]] = frozenset({"r", "init_weights"})

    def mixed_pad(self, arrays, members):
        """Ranks padded with zeros to the group's largest (``A`` columns, ``B`` rows): exact."""
        r = max(m.r for m in members)
        if r == self.r:
            return arrays
        out = dict(arrays)
        a = arrays["lora_A"]
        out["lora_A"] = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, r - self.r)])
        b = arrays["lora_B"]
        ax = self.layout.stack  # full-stack arrays: the stack axes lead, then B's rank axis
        out["lora_B"] = jnp.pad(b, [(0, r - self.r) if i == ax else (0, 0) for i in range(b.ndim)])
        return out

    #: up to this many stacked rank columns (adapters x rank), a mixed batch runs every
    #: adapter's ``A`` on every token as one dense matmul and masks each token to its own
    #: adapter's columns (fast dense matmuls); beyond, each example's ``A`` / ``B`` are gathered
    #: and run as a batched matmul (one adapter's work per token). Measured in
    #: benchmarks/mixed_batch.py.
    mixed_dense_columns: ClassVar[int] = 64
    mixed_neutral_exact: ClassVar[bool] = True  # scale 0 adds an exact 0; DoRA selects itself

    def mixed_forward(self, x3, y3, stack, slot, w2, scale, rng):
        a_st, b_st = stack["lora_A"], stack["lora_B"]
        k, r = a_st.shape[0], a_st.shape[-1]
        if not self.use_dora and self.layout.kind != "conv" and k * r <= self.mixed_dense_columns:
            n, t, d_in = x3.shape
            keys = None if rng is None else jax.random.split(rng, n)
            xd = x3.astype(a_st.dtype)
            if keys is not None and self.lora_dropout > 0.0:
                xd = jax.vmap(lambda x, kk: dropout(x, self.lora_dropout, kk))(xd, keys)
            a_cat = jnp.moveaxis(a_st, 0, -2).reshape(d_in, k * r)  # (in, K*r)
            h = (xd.reshape(n * t, d_in) @ a_cat).reshape(n, t, k, r)
            own = jax.nn.one_hot(slot, k, dtype=h.dtype) * jnp.take(scale, slot)[:, None].astype(
                h.dtype
            )
            h = h * own[:, None, :, None]
            lora = h.reshape(n * t, k * r) @ b_st.reshape(k * r, -1)
            acc = jnp.promote_types(y3.dtype, lora.dtype)
            return (y3.astype(acc) + lora.reshape(y3.shape)).astype(y3.dtype)
        if not self.use_dora:
            return super().mixed_forward(x3, y3, stack, slot, w2, scale, rng)
        # DoRA: each adapter's column norm once (not once per example), then gathered
        a_all = jax.vmap(self.a_matrix)(stack["lora_A"])
        norms = jax.vmap(lambda a, b, s: _factored_col_norm(w2, a, b, s))(
            a_all, stack["lora_B"], scale
        )
        g_all = stack["lora_magnitude_vector"].reshape(norms.shape) / jax.lax.stop_gradient(norms)
        a, b = jnp.take(a_all, slot, axis=0), jnp.take(stack["lora_B"], slot, axis=0)
        g, s = jnp.take(g_all, slot, axis=0)[:, None, :], jnp.take(scale, slot)[:, None, None]
        keys = None if rng is None else jax.random.split(rng, slot.shape[0])
        xd = x3.astype(a.dtype)
        if keys is not None and self.lora_dropout > 0.0:
            xd = jax.vmap(lambda x, k: dropout(x, self.lora_dropout, k))(xd, keys)
        lora = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", xd, a), b)
        acc = jnp.promote_types(y3.dtype, lora.dtype)
        base_d = y3 if keys is None or self.lora_dropout == 0.0 else xd @ w2.astype(xd.dtype)
        y = y3.astype(acc) + (g - 1) * base_d.astype(acc) + g * lora * s
        return jnp.where(s != 0, y, y3.astype(acc)).astype(y3.dtype)

    def mixed_gathered_forward(self, gather, y, stack, slot, scale):
        if not self.gather_factored:
            return None
        a = stack["lora_A"]  # (K, vocab, r)
        k, vocab, r = a.shape
        rows = gather(jnp.transpose(a, (1, 0, 2)).reshape(vocab, k * r))
        rows = rows.reshape(*rows.shape[:-1], k, r)  # (batch, ..., K, r)
        idx = slot.reshape((-1,) + (1,) * (rows.ndim - 1))
        mine = jnp.take_along_axis(rows, idx, axis=-2)[..., 0, :]  # (batch, ..., r)
        b = jnp.take(stack["lora_B"], slot, axis=0)  # (batch, r, n)
        out = jnp.einsum("b...r,brn->b...n", mine, b)
        s = jnp.take(scale, slot).reshape((-1,) + (1,) * (out.ndim - 1))
        acc = jnp.promote_types(y.dtype, out.dtype)
        return (y.astype(acc) + out * s).astype(y.dtype)

    # ---- files and special forwards ----------------------------------------------------------
    def file_rules(self):
        kind, nsp = self.layout.kind, len(self.layout.spatial(self.shape))
        if self.target_parameter is not None and self.layout.stack:
            e = self.n_layers
            return {
                "lora_A": ("lora_A.weight", _ExpertRule(L.RuleKind.SAME, factor="A", experts=e)),
                "lora_B": ("lora_B.weight", _ExpertRule(L.RuleKind.SAME, factor="B", experts=e)),
            }
        if kind == "embed":
            out = {
                "lora_A": ("lora_embedding_A", L.TRANSPOSE),
                "lora_B": ("lora_embedding_B", L.TRANSPOSE),
            }
            mag = L.SAME
        elif kind == "conv":
            out = {
                "lora_A": ("lora_A.weight", L.CONV),
                "lora_B": ("lora_B.weight", L.conv_1x1(nsp)),
            }
            mag = L.conv_vector(nsp)
        else:
            out = {
                "lora_A": ("lora_A.weight", L.TRANSPOSE),
                "lora_B": ("lora_B.weight", L.TRANSPOSE),
            }
            mag = L.SAME
        if self.use_dora:
            out["lora_magnitude_vector"] = ("lora_magnitude_vector", mag)
        return out

    def fusable(self, training):
        return not self.use_dora and not (training and self.lora_dropout > 0)

    @property
    def conv_factored(self):
        return not self.use_dora and self.layout.kind == "conv"

    def conv_forward(self, conv, x, y, arrays, scale, rng, feature_axis):
        """PEFT's conv LoRA: ``conv(dropout(x), A)`` then the 1x1 ``B``."""
        a = arrays["lora_A"]
        dt = jnp.promote_types(x.dtype, a.dtype)
        xd = dropout(x.astype(dt), self.lora_dropout, rng)
        t = conv(xd, a.astype(dt))
        t = jnp.moveaxis(
            jnp.moveaxis(t, feature_axis, -1) @ arrays["lora_B"].astype(dt), -1, feature_axis
        )
        acc = jnp.promote_types(y.dtype, t.dtype)
        return (y.astype(acc) + t * jnp.asarray(scale, t.dtype)).astype(y.dtype)

    @property
    def gather_factored(self):
        return not self.use_dora and self.layout.kind == "embed"

    def gathered_forward(self, gather, y, arrays, scale):
        """Embedding forward: ``y + (A[ids] @ B) * scale``."""
        out = gather(arrays["lora_A"]) @ arrays["lora_B"]
        acc = jnp.promote_types(y.dtype, out.dtype)
        return (y.astype(acc) + out * scale).astype(y.dtype)


def _factored_col_norm(w, a, b, scale):
    """``_col_norm(W + scale * A @ B)`` without building the ``(in, out)`` sum each step:
    ``||W||^2 + 2 s colsum(B * (A^T W)) + s^2 colsum(B * ((A^T A) B))``, all float32. Same
    FLOPs as building the delta (``A^T W`` is ``2 in r out``) but no weight-sized temporary;
    as precise as the direct form (relative error ~1e-7 in tests/test_numerics.py)."""
    w32, a32, b32 = (v.astype(jnp.float32) for v in (w, a, b))
    cross = jnp.sum(b32 * (a32.T @ w32), axis=0)
    own = jnp.sum(b32 * ((a32.T @ a32) @ b32), axis=0)
    sq = jnp.sum(jnp.square(w32), axis=0) + 2 * scale * cross + jnp.square(scale) * own
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def _col_norm(w):
    """L2 norm of each output column of an ``(in, out)`` matrix (PEFT's row norm of ``W^T``)."""
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=0))


@dataclasses.dataclass(frozen=True)
class _ExpertRule(L.Rule):
    """PEFT's ``lora.ParamWrapper`` layout of the LoRA factors of an ``(experts, in, out)``
    weight: ``lora_A.weight`` is ``(r * E, in)`` with row ``e * r + k`` = factor ``k`` of expert
    ``e``, ``lora_B.weight`` is ``(out, r * E)`` with column ``k * E + e`` (PEFT reshapes them
    to ``(E, r, in)`` and ``(out, r, E)``). Flax side: ``lora_A (E, in, r)``, ``lora_B (E, r,
    out)``, so expert ``e``'s delta is ``scale * lora_A[e] @ lora_B[e]``."""

    factor: str = "A"
    experts: int = 1

    def torch_shape(self, s):
        e, a, b = s
        return (e * b, a) if self.factor == "A" else (b, a * e)

    def flax_shape(self, t):
        e = self.experts
        return (e, t[1], t[0] // e) if self.factor == "A" else (e, t[1] // e, t[0])

    def to_torch(self, a):
        e, x, y = a.shape
        if self.factor == "A":  # (E, in, r) -> (E, r, in) -> (E * r, in)
            return a.transpose(0, 2, 1).reshape(e * y, x)
        return a.transpose(2, 1, 0).reshape(y, x * e)  # (E, r, out) -> (out, r, E) -> (out, r*E)

    def from_torch(self, t, shape):
        e, x, y = shape
        if self.factor == "A":
            return t.reshape(e, y, x).transpose(0, 2, 1)
        return t.reshape(y, x, e).transpose(2, 1, 0)


# ------------------------------------------------------------------------ add_weighted_adapter
# PEFT's ``LoraModel.add_weighted_adapter`` (`peftjax.arithmetic` has the rules in prose).


def combine_lora(call: CombineCall) -> dict[int, tuple[Spec, dict]]:
    """LoRA's combiner (`Method.combine`): the new adapter's spec and arrays on every site."""
    ct = "linear" if len(call.adapters) == 1 else call.combination_type
    rank = _check_lora(call.sites, call.adapters, ct, call.svd_rank)
    density, key = call.check_density(ct)
    if density is not None and density >= 1:  # nothing is pruned: the same kernel as
        ct, key = UNPRUNED.get(ct, ct), None  # the rule without pruning
    clamp = None if call.svd_clamp is None else float(call.svd_clamp)
    opts = (density, call.majority_sign_method, clamp, bool(call.svd_full_matrices))
    todo = [
        _lora_leaf(s, call.adapters, call.weights, call.concrete, ct, rank, opts, key)
        for s in call.sites
    ]
    outs = _lora_kernels(tuple(t[1] for t in todo), [t[2] for t in todo])
    return {s.leaf.index: (t[0], o) for s, t, o in zip(call.sites, todo, outs)}


def _check_lora(sites, adapters, ct: str, svd_rank) -> int:
    """PEFT's `_check_add_weighted_adapter` rules for LoRA; the new rank."""
    ranks: dict[str, int] = {}
    for s in sites:
        node = s.leaf.value
        specs = [(n, node.spec(n)) for _, n in s.present]
        for n, spec in specs:
            if not isinstance(spec, LoraSpec):
                raise ConfigError(f"adapter {n!r} on `{s.leaf.module}` is not a LoRA adapter.")
            if spec.target_parameter is not None:
                raise ConfigError(
                    "add_weighted_adapter does not support targeting nn.Parameter (problematic "
                    f"adapter {n!r}: `target_parameters` entry {spec.target_parameter!r})."
                )
            if spec.use_dora:
                raise ConfigError(
                    f"adapter {n!r} is DoRA (on `{s.leaf.module}`): combining DoRA adapters is "
                    "not supported (PEFT combines only their LoRA factors, drops the magnitude "
                    "vectors and gives the new adapter the magnitude of a fresh initialisation)."
                )
            ranks[n] = max(ranks.get(n, 0), spec.r)
        layouts = {spec.layout for _, spec in specs}
        if len(layouts) > 1:
            raise ShapeError(
                f"module `{s.leaf.module}`: the adapters read its weight with different layouts "
                f"{ {n: spec.layout for n, spec in specs} }; they cannot be combined."
            )
        if ct in FACTOR_WISE:
            rs = {n: spec.r for n, spec in specs}
            if len(set(rs.values())) > 1:
                raise ConfigError(
                    f"combination_type {ct!r} combines the LoRA factors themselves, so the "
                    f"adapters need the same rank, but on `{s.leaf.module}` they have ranks {rs}; "
                    "use 'cat' or an '*svd' type."
                )
    per_adapter = [ranks[n] for n in adapters]
    if ct in FACTOR_WISE:
        if len(set(per_adapter)) != 1:
            raise ConfigError(
                "All adapters must have the same r value when using combination_type linear, "
                "ties, dare_ties, dare_linear or magnitude_prune; got "
                f"{dict(zip(adapters, per_adapter))} (each adapter's largest rank)."
            )
        return per_adapter[0]
    if ct == "cat":
        return sum(per_adapter)
    return int(svd_rank) if svd_rank is not None else max(per_adapter)  # *svd


def _svd_factors(spec: LoraSpec, d, rank: int, clamp, full: bool):
    """PEFT's SVD step on one layer's combined delta ``d`` (``(in, out)`` matrix view):
    factors of the torch-layout ``d.T``, ``(A (in or conv kernel, k), B (k, out))``."""
    m = d.T  # torch (out, in); a conv's (out, in * kh * kw), PEFT's flatten(1)
    u, s, vh = jnp.linalg.svd(m, full_matrices=full)
    k = min(rank, s.shape[-1])
    u = u[:, :k] * s[:k]
    vh = vh[:k, :]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp)
        u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
    a = vh.T
    if spec.layout.kind == "conv":
        lay = (*spec.layout.spatial(spec.shape), spec.shape[-2], k)
        a = Layout("conv").from_matrix(a, lay)
    return a, u.T


def _lora_leaf(site, adapters, weights, concrete, ct, rank, opts, key):
    """The new LoRA adapter's spec on one weight leaf, and the static and array arguments of
    the `_lora_kernel` that makes its arrays."""
    node = site.leaf.value
    specs = tuple(node.spec(n) for _, n in site.present)
    spec0 = specs[0]
    n = spec0.n_layers
    scales = np.asarray([sp.scaling for sp in specs], np.float64)  # (k adapters, n layers)
    wa, wb = weight_table([weights[i] for i, _ in site.present], concrete, scales)
    w32 = jnp.stack([jnp.asarray(weights[i], jnp.float32) for i, _ in site.present])
    if ct in FACTOR_WISE:
        layer_rank = spec0.r
    elif ct == "cat":
        layer_rank = rank
    else:
        layer_rank = min(rank, *spec0.in_out)
    keys = None
    if key is not None:
        keys = jax.random.split(jax.random.fold_in(key, site.leaf.index), (n, len(specs), 2))
    layers = sorted(set().union(*(sp.stored_layers for sp in specs)))
    on = set(layers)
    ref = first_spec(adapters, node, specs)
    new = LoraSpec(
        layout=spec0.layout,
        shape=spec0.shape,
        scaling=tuple(1.0 if i in on else 0.0 for i in range(n)),
        layers=tuple(layers) if spec0.layout.stack else None,
        r=int(layer_rank),
        lora_dropout=ref.lora_dropout,
        init_weights=ref.init_weights,
    )
    dtype = jnp.dtype(node.arrays[site.present[0][1]]["lora_A"].dtype).name
    static = (ct, specs, new, int(rank), opts, dtype)
    arrays = [node.arrays[nm] for _, nm in site.present]
    return new, static, (arrays, wa, wb, w32, keys)


@functools.partial(jax.jit, static_argnums=0)
def _lora_kernels(statics, args):
    """`_lora_kernel` of every leaf, compiled as one function."""
    return [_lora_kernel(st, *a) for st, a in zip(statics, args)]


def _lora_kernel(static, arrays, wa, wb, w32, keys):
    """The new adapter's arrays on one leaf (as `new` stores them), from the adapters' arrays
    there: PEFT's rule of combination type ``ct`` run on each layer slice."""
    ct, specs, new, rank, opts, dtype = static
    density, sign_method, clamp, full = opts
    rule = rule_of(ct)
    spec0, n = specs[0], specs[0].n_layers
    flats = [flat_layers(sp, a, n) for sp, a in zip(specs, arrays)]
    s32 = jnp.asarray(np.asarray([sp.scaling for sp in specs], np.float32))

    def one_layer(arrs, wa_l, wb_l, s_l, k_l):
        a_list = [x["lora_A"] for x in arrs]
        b_list = [x["lora_B"] for x in arrs]
        if ct == "cat":
            a = [
                (a * w32[i].astype(a.dtype)) * s_l[i].astype(a.dtype) for i, a in enumerate(a_list)
            ]
            a, b = jnp.concatenate(a, axis=-1), jnp.concatenate(b_list, axis=0)
            pad = rank - a.shape[-1]
            a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
            b = jnp.pad(b, [(0, pad), (0, 0)])
            return {"lora_A": a, "lora_B": b}
        if ct in FACTOR_WISE:
            ka = None if k_l is None else k_l[:, 0]
            kb = None if k_l is None else k_l[:, 1]
            a = merge_tensors(rule, a_list, wa_l, density, sign_method, ka)
            b = merge_tensors(rule, b_list, wb_l, density, sign_method, kb)
            return {"lora_A": a.astype(dtype), "lora_B": b.astype(dtype)}
        deltas = [sp.delta_matrix(x, s_l[i]) for i, (sp, x) in enumerate(zip(specs, arrs))]
        kd = None if k_l is None else k_l[:, 0]
        d = merge_tensors(rule, deltas, w32, density, sign_method, kd)
        a, b = _svd_factors(spec0, d, new.r, clamp, full)
        return {"lora_A": a.astype(dtype), "lora_B": b.astype(dtype)}

    fn = jax.vmap(one_layer, in_axes=(0, 1, 1, 1, None if keys is None else 0))
    return store(new, fn(flats, wa, wb, s32, keys), new.layers)
