"""Prefix tuning (PEFT's ``PrefixTuningConfig``, ``tuners/prefix_tuning``): trainable keys and
values in front of every attention layer's (the ``"prefix"`` route of `peftjax.methods.prompt`).

The prefix is ``[T, 2·L·D_kv]`` in PEFT's flat layout (``D_kv = H_kv·d``, the model's key/value
width; with grouped-query attention PEFT sets ``token_dim = D_kv`` and ``num_attention_heads =
H_kv``, and so does peftjax): viewed ``[T, 2L, H_kv, d]``, layer ``l``'s keys are slot ``2l`` and
its values slot ``2l + 1``. They enter the model's attention as a pre-filled KV cache, unrotated,
with the real tokens at positions ``T..T+N-1`` and the mask extended by ``T`` ones (PEFT's
``past_key_values``): `pj.prompt_inputs(params, ids, mask, model=model)` builds that cache for
transformers' Flax Llama-family and GPT-2 models (their ``init_cache`` layout, explicit
``position_ids``), or passes ``prefix_key_values`` (one ``(keys, values)`` pair of ``[B, T,
H_kv, d]`` per layer) to a model whose ``__call__`` takes that keyword (peftjax's demo model
does). Another model is an `UnsupportedModuleError`: a prefix cannot be faked with extra tokens
(they would be rotated and sit at the wrong positions).

Arrays: without ``prefix_projection``, ``embedding.weight [T, 2·L·D_kv]`` (N(0, 1); zeros with
``init_weights="zero"``); with it, ``embedding.weight [T, D_kv]`` and PEFT's ``transform``
(Linear(D_kv, H_e) -> tanh -> Linear(H_e, 2·L·D_kv), torch's init; the last layer zero with
``init_weights="zero"``). ``num_layers`` and ``token_dim`` are read from the tree when ``None``:
the number of key projections (modules named ``k_proj``, ``key``, ``k``..., or GPT-2's fused
``c_attn``) and their output width; `from_model_config` fills them, and
``num_attention_heads``, from a transformers config as PEFT does. Files hold
``prompt_embeddings`` = the prefix (the projection's output: PEFT never saves ``transform``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..config import fail
from ..errors import ConfigError, ShapeError, UnsupportedModuleError
from .base import kaiming_uniform
from .prompt import PromptLearningConfig, PromptSpec, find_word_embedding, positive_int

__all__ = ["PrefixTuningConfig", "PrefixTuningSpec"]

#: module names of attention key projections (their output width is ``D_kv``)
KEY_PROJECTIONS = ("k_proj", "key", "k", "wk", "k_lin", "key_proj")
#: module names of attention query projections (a width unlike the keys': grouped-query)
QUERY_PROJECTIONS = ("q_proj", "query", "q", "wq", "q_lin", "query_proj")
#: fused query/key/value projections whose key width is the hidden size (GPT-2)
FUSED_QKV = ("c_attn",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: per-layer trainable key/value prefixes.

    Attributes:
      (shared: common prompt)
      num_virtual_tokens: (shared)
      token_dim: the key/value width ``D_kv`` (PEFT's, with grouped-query attention: heads times
        head size of the keys); ``None``: read from the tree's key projections.
      num_transformer_submodules: (shared)
      num_attention_heads: the number of key/value heads; ``None``: filled by ``from_model_config``.
      num_layers: the number of attention layers (one prefix per layer); ``None``: the number of key
        projections in the tree.
      encoder_hidden_size: with ``prefix_projection``: the hidden size of PEFT's ``transform`` MLP;
        ``None``: ``token_dim``.
      prefix_projection: reparameterise the prefix through PEFT's ``transform`` MLP (Linear, tanh,
        Linear).
      init_weights: ``None`` (``N(0, 1)`` prefix, or torch's init of the MLP) or ``"zero"`` (a zero
        prefix, or a zero last MLP layer).

    Example:

      >>> PrefixTuningConfig(num_virtual_tokens=4, num_layers=2, token_dim=16).method
      'prefix_tuning'
      >>> PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True).method_label
      'prefix_tuning(projection)'
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    method: ClassVar[str] = "prefix_tuning"
    route: ClassVar[str] = "prefix"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("encoder_hidden_size", self.encoder_hidden_size, optional=True)
        if not isinstance(self.prefix_projection, bool):
            raise fail("prefix_projection", self.prefix_projection, "must be a bool.")
        if self.init_weights not in (None, "zero"):
            raise fail("init_weights", self.init_weights, 'must be None or "zero".')

    @classmethod
    def from_model_config(cls, model_config, **fields) -> PrefixTuningConfig:
        """PEFT's sizes from a transformers config: ``num_layers``, ``num_attention_heads`` =
        the KV heads and ``token_dim`` = their width (PEFT's grouped-query rule)."""
        from ._prefix_cache import kv_layout

        n_layers, kv, hd = kv_layout(model_config)
        sizes = dict(num_layers=n_layers, num_attention_heads=kv, token_dim=kv * hd)
        return cls(**{**sizes, **fields})

    @property
    def method_label(self) -> str:
        return "prefix_tuning(projection)" if self.prefix_projection else "prefix_tuning"

    def plan_targets(self, groups, layouts):
        from .._plan import Planned
        from .._tree import weight_leaf
        from ..layout import Layout

        mod, w = find_word_embedding(self, groups, layouts)
        cfg = self
        if self.num_layers is None or self.token_dim is None:
            keys, width, q_width = [], set(), set()
            for m, g in groups.items():
                name = m.rsplit(".", 1)[-1]
                wl = weight_leaf(g)
                if wl is not None and name in QUERY_PROJECTIONS:
                    q_width.add(int(wl.base.shape[-1]))
                if wl is None or name not in KEY_PROJECTIONS + FUSED_QKV:
                    continue
                shape = tuple(wl.base.shape)
                n = shape[0] if len(shape) == 3 else 1  # a stacked (scanned) kernel
                keys += [m] * n
                width.add(int(w.base.shape[1]) if name in FUSED_QKV else int(shape[-1]))
            if self.num_attention_heads is None and q_width and q_width != width:
                # PEFT fills a missing head count with the *query* heads and re-derives token_dim
                # from it, which breaks on grouped-query models whose config has no `head_dim`
                raise ConfigError(
                    f"`num_attention_heads`=None: the model has grouped-query attention (query "
                    f"width {sorted(q_width)}, key/value width {sorted(width)}), so the prefix "
                    "file must name its key/value heads for PEFT to read it: set "
                    "`num_attention_heads` to the KV heads, or build the config with "
                    "`PrefixTuningConfig.from_model_config(model.config, ...)`."
                )
            if not keys or len(width) != 1:
                raise ConfigError(
                    "PrefixTuningConfig: `num_layers` / `token_dim` are None and cannot be read "
                    f"from the tree (key projections found: {sorted(set(keys))[:4]}, widths "
                    f"{sorted(width)}); set them (token_dim = the KV width, heads_kv * "
                    "head_dim), or use `PrefixTuningConfig.from_model_config(model.config, ...)`."
                )
            cfg = dataclasses.replace(
                self,
                num_layers=self.num_layers or len(keys),
                token_dim=self.token_dim or width.pop(),
            )
        return [Planned(mod, [w], w, Layout("embed"), None, config=cfg)]

    def file_config(self, spec):
        return dataclasses.replace(
            self,
            num_transformer_submodules=1,
            encoder_hidden_size=self.encoder_hidden_size or self.token_dim,
        )

    def module_spec(self, path, layout, shape, mask):
        return PrefixTuningSpec(layout=layout, shape=tuple(shape), scaling=(1.0,), config=self)


@dataclasses.dataclass(frozen=True)
class PrefixTuningSpec(PromptSpec):
    @property
    def width(self) -> int:
        """``2·L·D_kv``: one virtual token's keys and values over every layer."""
        return 2 * int(self.config.num_layers) * int(self.config.token_dim)

    @property
    def hidden(self) -> int:
        return int(self.config.encoder_hidden_size or self.config.token_dim)

    def describe(self) -> str:
        proj = ", projection" if self.config.prefix_projection and not self.loaded else ""
        return f"prefix_tuning(T={self.n_tokens}, L={self.config.num_layers}{proj})"

    def init_layer(self, key, w_layer, scale, dtype):
        cfg, t = self.config, self.n_tokens
        zero = cfg.init_weights == "zero"
        if not cfg.prefix_projection:
            shape = (t, self.width)
            emb = jnp.zeros(shape, dtype) if zero else jax.random.normal(key, shape, dtype)
            return {"embedding.weight": emb}
        d, h = int(cfg.token_dim), self.hidden
        k = jax.random.split(key, 5)
        out = {
            "embedding.weight": jax.random.normal(k[0], (t, d), dtype),
            "transform.0.weight": kaiming_uniform(k[1], (h, d), d, dtype),
            "transform.0.bias": kaiming_uniform(k[2], (h,), d, dtype),
            "transform.2.weight": kaiming_uniform(k[3], (self.width, h), h, dtype),
            "transform.2.bias": kaiming_uniform(k[4], (self.width,), h, dtype),
        }
        if zero:
            out["transform.2.weight"] = jnp.zeros_like(out["transform.2.weight"])
            out["transform.2.bias"] = jnp.zeros_like(out["transform.2.bias"])
        return out

    def prefix(self, arrays):
        """``[T, 2·L·D_kv]`` float32: the prefix (the projection's output with projection)."""
        if self.loaded:
            return arrays["prompt_embeddings"].astype(jnp.float32)
        x = arrays["embedding.weight"].astype(jnp.float32)
        if not self.config.prefix_projection:
            return x
        hi = jax.lax.Precision.HIGHEST
        f = lambda n: arrays[n].astype(jnp.float32)
        h = jnp.tanh(jnp.dot(x, f("transform.0.weight").T, precision=hi) + f("transform.0.bias"))
        return jnp.dot(h, f("transform.2.weight").T, precision=hi) + f("transform.2.bias")

    def file_tensors(self, arrays, module):
        return {"prompt_embeddings": np.asarray(self.prefix(arrays), np.float32)}

    def loaded_spec(self):
        return dataclasses.replace(self, loaded=True)

    def arrays_from_file(self, tensors, module, used, dtype):
        want = (self.n_tokens, self.width)
        return {"prompt_embeddings": self.prompt_from_file(tensors, used, dtype, want=want)}

    # ---- the route ----------------------------------------------------------------------------
    def prefix_inputs(self, model, prefix, out: dict, attention_mask):
        """`pj.prompt_inputs`' arguments with the prefix in ``model``'s cache (module docstring)."""
        from ..prompt import takes_keyword
        from ._prefix_cache import hf_prefix_inputs, kv_layout

        cfg = self.config
        if model is None:
            raise ConfigError(
                "`model`: prefix tuning hands its keys and values to the model as a KV cache; "
                "pass the model object (`pj.prompt_inputs(params, ids, mask, model=model)`)."
            )
        if callable(getattr(model, "init_cache", None)) and hasattr(model, "config"):
            n_layers, kv, hd = kv_layout(model.config)
            self._check_sizes(n_layers, kv, hd, type(model).__name__)
            kw = hf_prefix_inputs(
                model,
                prefix,
                out["input_ids"],
                attention_mask,
                num_kv_heads=kv,
                head_dim=hd,
                num_layers=n_layers,
            )
            for k in ("labels", "token_type_ids"):
                if k in out:
                    kw[k] = out[k]
            return kw
        if not callable(model) or not takes_keyword(model, "prefix_key_values"):
            raise UnsupportedModuleError(
                f"prefix tuning: {type(model).__name__} takes no KV cache (neither a "
                "transformers Flax model's `init_cache` / `past_key_values` nor a "
                "`prefix_key_values` keyword), and a prefix cannot be given as extra tokens "
                "(PEFT's prefixes are unrotated, before positions 0..N-1). Supported: "
                "FlaxLlamaForCausalLM-family and FlaxGPT2LMHeadModel models, and models whose "
                "`__call__` takes `prefix_key_values`."
            )
        kv = cfg.num_attention_heads
        if kv is None:
            raise ConfigError(
                "`num_attention_heads`=None: set it to the model's key/value heads so that the "
                "prefix can be split into heads for `prefix_key_values`."
            )
        hd = int(cfg.token_dim) // int(kv)
        b, t = out["input_ids"].shape[0], self.n_tokens
        x = prefix.reshape(t, 2 * int(cfg.num_layers), int(kv), hd)
        x = jnp.broadcast_to(x[None], (b, *x.shape))
        out["prefix_key_values"] = tuple(
            (x[:, :, 2 * i], x[:, :, 2 * i + 1]) for i in range(int(cfg.num_layers))
        )
        if attention_mask is not None:
            ones = jnp.ones((b, t), attention_mask.dtype)
            out["attention_mask"] = jnp.concatenate([ones, attention_mask], axis=1)
        return out

    def _check_sizes(self, n_layers: int, kv: int, hd: int, model: str) -> None:
        cfg = self.config
        if int(cfg.num_layers) != n_layers:
            raise ShapeError(
                f"`num_layers`={cfg.num_layers}: the prefix has keys and values for "
                f"{cfg.num_layers} layers, but {model} has {n_layers}."
            )
        if int(cfg.token_dim) != kv * hd:
            raise ShapeError(
                f"`token_dim`={cfg.token_dim}: the prefix's per-layer key width, but {model}'s "
                f"keys are {kv} heads x {hd} = {kv * hd} wide."
            )
        if cfg.num_attention_heads is not None and int(cfg.num_attention_heads) != kv:
            raise ShapeError(
                f"`num_attention_heads`={cfg.num_attention_heads}: {model} has {kv} key/value "
                "heads (PEFT stores the KV heads here)."
            )
