"""Adaption prompt / LLaMA-Adapter (PEFT's ``AdaptionPromptConfig``, ``tuners/adaption_prompt``):
``adapter_len`` learned prompt tokens attended, through a zero-initialised gate, by the top
``adapter_layers`` attention layers (the ``"attention"`` route of `peftjax.methods.prompt`).

Per wrapped layer: ``adaption_prompt [1, Lp, hidden]`` (N(0, 1)) and ``adaption_gate [1]`` (0, so
a fresh adapter is exactly the base model). The layer's output gains ``o_proj(gate *
softmax(q K_pᵀ / sqrt(d)) V_p)`` with ``K_p = k_proj(P)``, ``V_p = v_proj(P)`` (unrotated, KV heads
repeated as HF's ``repeat_kv``) and ``q`` the layer's own rotated queries; the mask and the
positions are untouched (`peftjax.methods._adaption_forward` has PEFT's math and casts).

Which modules: the last ``adapter_layers`` modules named ``target_modules`` (default
``"self_attn"``, PEFT's for Llama and Mistral), in model order (``layers.10`` after
``layers.9``). The arrays sit on each one's ``q_proj`` weight leaf (which keeps its value).
`pj.apply` runs the function with those attention modules wrapped by a `flax.linen` method
interceptor, so it serves transformers' ``FlaxLlamaForCausalLM`` (and Mistral) and Llama-style
linen attention (``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` and a ``rotary_emb`` or an
``adaption_queries`` method, see `peftjax.methods._adaption_forward`) unchanged. nnx modules and
plain functions have no method interception: `pj.apply` raises `UnsupportedModuleError` naming
the module the adapter could not reach, and so does GPT-2's fused ``c_attn`` (PEFT's GPT-2 rule
adds the output without ``c_proj``; not implemented).

Files: ``base_model.model.<attention module>.adaption_prompt`` and ``.adaption_gate``, PEFT's
keys. Cannot merge.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..config import AdapterConfig, fail
from ..errors import ConfigError, FormatError, UnsupportedModuleError
from .prompt import PromptSpec, check_file_shape, positive_int

__all__ = ["AdaptionPromptConfig", "AdaptionPromptSpec"]

_PREFIX = "base_model.model."


def _natural(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptionPromptConfig(AdapterConfig):
    """LLaMA-Adapter: gated prompt attention in the top ``adapter_layers`` attention layers.

    Attributes:
      task_type: (shared)
      base_model_name_or_path: (shared)
      revision: (shared)
      inference_mode: (shared)
      target_modules: the name of the attention modules to wrap (a str; default ``"self_attn"``,
        PEFT's Llama default; Llama-style attentions with ``q_proj`` ... ``o_proj`` only).
      exclude_modules: not a field of PEFT's ``AdaptionPromptConfig`` and not used (the
        wrapped modules are chosen by ``target_modules`` and ``adapter_layers``); leave it
        ``None``.
      modules_to_save: not a field of PEFT's ``AdaptionPromptConfig``; written to the file
        only when set.
      adapter_len: the number of adaption-prompt tokens per layer (required).
      adapter_layers: how many attention layers, from the top, get a prompt (required).

    Example:

      >>> AdaptionPromptConfig(adapter_len=4, adapter_layers=2).target_modules
      'self_attn'
    """

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"
    method: ClassVar[str] = "adaption_prompt"
    route: ClassVar[str] = "attention"

    adapter_len: int | None = None
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        if self.target_modules is None:
            object.__setattr__(self, "target_modules", "self_attn")  # PEFT's Llama default
        super().__post_init__()
        if not isinstance(self.target_modules, str):
            raise fail(
                "target_modules",
                self.target_modules,
                "adaption prompt wraps the modules of one name (PEFT: a str, e.g. 'self_attn').",
            )
        for f in ("adapter_len", "adapter_layers"):
            if getattr(self, f) is None:
                raise fail(f, None, "is required (a positive int).")
            positive_int(f, getattr(self, f))

    def plan_targets(self, groups, layouts):
        from .._plan import Planned
        from .._tree import weight_leaf
        from ..layout import Layout

        name = self.target_modules
        attn = sorted(
            {
                ".".join(parts[: i + 1])
                for m in groups
                for parts in [m.split(".")]
                for i, p in enumerate(parts)
                if p == name and i < len(parts) - 1
            },
            key=_natural,
        )
        if self.adapter_layers > len(attn):
            raise ConfigError(
                f"`adapter_layers`={self.adapter_layers}: the model has {len(attn)} "
                f"`{name}` module(s) ({attn[:3]}{'...' if len(attn) > 3 else ''}); "
                "adaption prompt wraps at most that many."
            )
        plan = []
        for a in attn[len(attn) - self.adapter_layers :]:
            q = groups.get(f"{a}.q_proj")
            w = weight_leaf(q) if q else None
            if w is None or len(getattr(w.base, "shape", ())) != 2:
                have = sorted({m[len(a) + 1 :].split(".")[0] for m in groups if m.startswith(a)})
                raise UnsupportedModuleError(
                    f"module `{a}`: adaption prompt needs a Llama-style attention with 2-D "
                    f"`q_proj`, `k_proj`, `v_proj` and `o_proj` kernels; it has {have}."
                )
            plan.append(Planned(f"{a}.q_proj", [w], w, Layout("dense"), None))
        return plan

    def module_spec(self, path, layout, shape, mask):
        return AdaptionPromptSpec(layout=layout, shape=tuple(shape), scaling=(1.0,), config=self)

    def file_config(self, spec):
        return self

    @classmethod
    def from_specs(cls, entries, common):
        raise NotImplementedError  # the spec keeps its config (`file_config`)

    def to_dict(self):
        out = super().to_dict()
        for f in ("exclude_modules", "modules_to_save"):
            if out.get(f) is None:
                out.pop(f, None)  # not fields of PEFT's AdaptionPromptConfig
        return out


@dataclasses.dataclass(frozen=True)
class AdaptionPromptSpec(PromptSpec):
    @property
    def n_tokens(self) -> int:
        return int(self.config.adapter_len)

    @property
    def hidden(self) -> int:
        return int(self.shape[0])  # q_proj's input features

    def describe(self) -> str:
        return f"adaption_prompt(Lp={self.n_tokens})"

    def init_layer(self, key, w_layer, scale, dtype):
        return {
            "adaption_prompt": jax.random.normal(key, (1, self.n_tokens, self.hidden), dtype),
            "adaption_gate": jnp.zeros((1,), dtype),
        }

    @staticmethod
    def _attention(module: str) -> str:
        return module.rsplit(".", 1)[0]  # the leaf's module is `<attention>.q_proj`

    def file_tensors(self, arrays, module):
        a = f"{_PREFIX}{self._attention(module)}"
        return {
            f"{a}.adaption_prompt": np.asarray(arrays["adaption_prompt"], np.float32),
            f"{a}.adaption_gate": np.asarray(arrays["adaption_gate"], np.float32),
        }

    def arrays_from_file(self, tensors, module, used, dtype):
        a = f"{_PREFIX}{self._attention(module)}"
        out = {}
        for n, want in (
            ("adaption_prompt", (1, self.n_tokens, self.hidden)),
            ("adaption_gate", (1,)),
        ):
            k = f"{a}.{n}"
            if k not in tensors:
                raise FormatError(f"adapter file: missing tensor `{k}` {list(want)}.")
            check_file_shape(k, tensors[k].shape, want, "adaption_prompt adapter file")
            used.add(k)
            out[n] = jnp.asarray(np.asarray(tensors[k], np.float32), dtype)
        return out

    def run_hooked(self, targets, fn, args, kwargs):
        """``fn(*args, **kwargs)`` with every target's attention module wrapped (module
        docstring); ``targets`` = ``[(leaf module, spec, arrays)]``."""
        import flax.linen as nn

        from ._adaption_forward import interceptor

        table = {
            tuple(self._attention(m).split(".")): (a["adaption_prompt"], a["adaption_gate"])
            for m, _, a in targets
        }
        inner = interceptor(table)
        seen: set = set()

        def watch(next_fun, a, k, context):
            if context.method_name == "__call__":
                path = tuple(getattr(context.module, "path", None) or ())
                if path in table:
                    seen.add(path)
            return inner(next_fun, a, k, context)

        with nn.intercept_methods(watch):
            out = fn(*args, **kwargs)
        missed = [".".join(p) for p in table if p not in seen]
        if missed:
            raise UnsupportedModuleError(
                f"adaption prompt: the function never called the attention module `{missed[0]}` "
                "as a flax.linen module, so its prompt could not be added. Supported: "
                "transformers' Flax Llama-family models and linen Llama-style attention "
                "(module paths as the params'); nnx modules and plain functions are not."
            )
        return out
