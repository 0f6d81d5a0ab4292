"""The method registry: one row per method, and the only thing generic code asks about methods.

Each method lives in one module of this package (`lora`, `loha`, `lokr`, `oft`, `vera`,
`adalora`, `ia3`, `ln_tuning`, and the methods that act on activations, `prompt_tuning`,
`p_tuning`, `prefix_tuning`, `multitask_prompt_tuning`, `adaption_prompt`, whose shared part is
`prompt`), which holds everything about it: its config class (PEFT's field
names, defaults, validation, how a module's spec is made from it and how it is rebuilt from
specs), its `Spec` (init, delta, merge / unmerge, forward rules for dense, conv and embedding
uses, PEFT file rules, which arrays are parameters and which never train). `inject`, `merge`,
the forward, the files, training, checkpoints, the CLI and the demo reach a method only through
`METHODS` and the functions here.

Adding a method: write its module, add one `Method` row to `METHODS`, add its rows to the test
case table (``tests/cases.py``); nothing else changes.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

from ..config import AdapterConfig, fail
from ..errors import ConfigError
from ..layout import Layout
from .adalora import API as ADALORA_API, AdaLoraConfig, AdaLoraSpec
from .adaption_prompt import AdaptionPromptConfig, AdaptionPromptSpec
from .base import COPY, DELTA, DERIVED, PROMPT, Spec
from .ia3 import IA3BiasSpec, IA3Config, IA3Spec, combine_ia3
from .ln_tuning import LN_INFIX, CopySpec, LNTuningConfig
from .loha import LoHaConfig, LoHaSpec
from .lokr import LoKrConfig, LoKrSpec, factorization
from .lora import LoraConfig, LoraSpec, combine_lora
from .multitask_prompt_tuning import MultitaskPromptTuningConfig, MultitaskPromptTuningSpec
from .oft import OFTConfig, OFTSpec
from .p_tuning import PromptEncoderConfig, PromptEncoderSpec
from .prefix_tuning import PrefixTuningConfig, PrefixTuningSpec
from .prompt_tuning import PromptTuningConfig, PromptTuningSpec
from .vera import VERA_A_KEY, VERA_B_KEY, VeraConfig, VeraSpec

__all__ = [
    "COPY",
    "DELTA",
    "DERIVED",
    "METHODS",
    "PROMPT",
    "PEFT_TYPES",
    "Method",
    "Spec",
    "config_from_dict",
    "factorization",
    "method_named",
    "method_of",
    "method_of_peft_type",
    "modules_to_save_spec",
]


@dataclasses.dataclass(frozen=True)
class Method:
    """One registry row.

    Attributes:
      name: the method's name (``config.method``, ``spec.method``).
      config: its config class (``config.peft_type`` is PEFT's ``peft_type``).
      specs: the spec classes it makes.
      adapts: the weight kinds (`Layout.kind`) it can adapt; empty for a method that copies
        whole modules (`whole_modules`).
      key_suffixes: PEFT file key suffixes of its arrays.
      embed_suffixes: those of `key_suffixes` that only an embedding module has (the merge CLI
        reads a module's kind from them).
      whole_modules: the method copies every leaf of a targeted module (LN tuning), whatever its
        shape, instead of adapting one weight.
      whole_infix: PEFT's key infix of those copies.
      shared_keys: full file keys of adapter-wide arrays (not under a module path), e.g.
        VeRA's ``base_model.vera_A``.
      adapter_keys: the bare file keys of a prompt-learning method (PEFT saves them with no
        module path: ``prompt_embeddings``...); its files are read and written by its spec
        (`peftjax.methods.prompt.PromptSpec`), not by module.
      api: public functions of the method that ``peftjax`` exports by name (e.g. a method's
        training-time functions).
      demos: ``{demo name: (config factory (rank) -> config, uses the rank, learning rate)}``
        for ``peftjax demo --method``.
      combine: the method's combiner for `pj.add_weighted_adapter`
        (`peftjax.methods._combine.CombineCall` -> ``{leaf index: (spec, arrays)}``), or
        ``None`` where PEFT has no ``add_weighted_adapter`` for the method.
    """

    name: str
    config: type[AdapterConfig]
    specs: tuple[type[Spec], ...]
    adapts: tuple[str, ...]
    key_suffixes: tuple[str, ...]
    embed_suffixes: tuple[str, ...] = ()
    whole_modules: bool = False
    whole_infix: str | None = None
    shared_keys: tuple[str, ...] = ()
    adapter_keys: tuple[str, ...] = ()
    api: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    demos: Mapping[str, tuple[Callable[[int], AdapterConfig], bool, float]] = dataclasses.field(
        default_factory=dict
    )
    combine: Callable[..., dict] | None = None

    @property
    def peft_type(self) -> str:
        return self.config.peft_type


_DEMO_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

METHODS: Mapping[str, Method] = types.MappingProxyType(
    {
        m.name: m
        for m in (
            Method(
                "lora",
                LoraConfig,
                (LoraSpec,),
                combine=combine_lora,
                adapts=("dense", "conv", "embed"),
                key_suffixes=(
                    "lora_A.weight",
                    "lora_B.weight",
                    "lora_B.bias",
                    "lora_embedding_A",
                    "lora_embedding_B",
                    "lora_magnitude_vector",
                ),
                embed_suffixes=("lora_embedding_A", "lora_embedding_B"),
                demos={
                    "lora": (
                        lambda r: LoraConfig(r=r, lora_alpha=2 * r, target_modules=_DEMO_TARGETS),
                        True,
                        4e-3,
                    ),
                    "dora": (
                        lambda r: LoraConfig(
                            r=r, lora_alpha=2 * r, target_modules=_DEMO_TARGETS, use_dora=True
                        ),
                        True,
                        4e-3,
                    ),
                },
            ),
            Method(
                "adalora",
                AdaLoraConfig,
                (AdaLoraSpec,),
                adapts=("dense", "conv"),
                key_suffixes=("lora_A", "lora_B", "lora_E"),
                api=ADALORA_API,
            ),
            Method(
                "loha",
                LoHaConfig,
                (LoHaSpec,),
                adapts=("dense", "conv"),
                key_suffixes=(
                    "hada_w1_a",
                    "hada_w1_b",
                    "hada_w2_a",
                    "hada_w2_b",
                    "hada_t1",
                    "hada_t2",
                ),
                demos={
                    "loha": (
                        lambda r: LoHaConfig(r=r, alpha=2 * r, target_modules=_DEMO_TARGETS),
                        True,
                        4e-3,
                    )
                },
            ),
            Method(
                "lokr",
                LoKrConfig,
                (LoKrSpec,),
                adapts=("dense", "conv"),
                key_suffixes=(
                    "lokr_w1",
                    "lokr_w1_a",
                    "lokr_w1_b",
                    "lokr_w2",
                    "lokr_w2_a",
                    "lokr_w2_b",
                    "lokr_t2",
                ),
                demos={
                    "lokr": (
                        lambda r: LoKrConfig(r=r, alpha=2 * r, target_modules=_DEMO_TARGETS),
                        True,
                        4e-3,
                    )
                },
            ),
            Method(
                "ia3",
                IA3Config,
                (IA3Spec, IA3BiasSpec),
                combine=combine_ia3,
                adapts=("dense", "conv"),
                key_suffixes=("ia3_l",),
                demos={
                    "ia3": (
                        lambda r: IA3Config(
                            target_modules=["k_proj", "v_proj", "down_proj"],
                            feedforward_modules=["down_proj"],
                        ),
                        False,
                        3e-2,
                    )
                },
            ),
            Method(
                "oft",
                OFTConfig,
                (OFTSpec,),
                adapts=("dense", "conv", "embed"),
                key_suffixes=("oft_R.weight", "oft_embedding_R.weight"),
                embed_suffixes=("oft_embedding_R.weight",),
            ),
            Method(
                "vera",
                VeraConfig,
                (VeraSpec,),
                adapts=("dense",),
                key_suffixes=("vera_lambda_b", "vera_lambda_d"),
                shared_keys=(VERA_A_KEY, VERA_B_KEY),
            ),
            Method(
                "prompt_tuning",
                PromptTuningConfig,
                (PromptTuningSpec,),
                adapts=("embed",),
                key_suffixes=(),
                adapter_keys=("prompt_embeddings",),
                demos={
                    "prompt_tuning": (
                        lambda r: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
                        False,
                        3e-2,
                    )
                },
            ),
            Method(
                "p_tuning",
                PromptEncoderConfig,
                (PromptEncoderSpec,),
                adapts=("embed",),
                key_suffixes=(),
                adapter_keys=("prompt_embeddings",),
            ),
            Method(
                "prefix_tuning",
                PrefixTuningConfig,
                (PrefixTuningSpec,),
                adapts=("embed",),
                key_suffixes=(),
                adapter_keys=("prompt_embeddings",),
                demos={
                    "prefix_tuning": (
                        lambda r: PrefixTuningConfig(
                            task_type="CAUSAL_LM", num_virtual_tokens=8, num_attention_heads=4
                        ),
                        False,
                        3e-2,
                    )
                },
            ),
            Method(
                "multitask_prompt_tuning",
                MultitaskPromptTuningConfig,
                (MultitaskPromptTuningSpec,),
                adapts=("embed",),
                key_suffixes=(),
                adapter_keys=("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"),
            ),
            Method(
                "adaption_prompt",
                AdaptionPromptConfig,
                (AdaptionPromptSpec,),
                adapts=("dense",),
                key_suffixes=("adaption_prompt", "adaption_gate"),
            ),
            Method(
                "ln_tuning",
                LNTuningConfig,
                (CopySpec,),
                adapts=(),
                key_suffixes=(),
                whole_modules=True,
                whole_infix=LN_INFIX,
            ),
        )
    }
)

#: PEFT's `peft_type` string -> config class.
PEFT_TYPES: Mapping[str, type[AdapterConfig]] = types.MappingProxyType(
    {m.peft_type: m.config for m in METHODS.values()}
)


def method_named(name: str) -> Method:
    """The row of method ``name``; `ConfigError` naming the known ones otherwise."""
    m = METHODS.get(name) if isinstance(name, str) else None
    if m is None:
        raise ConfigError(f"unknown method {name!r}; the registered methods are {sorted(METHODS)}.")
    return m


def method_of(obj: AdapterConfig | Spec) -> Method:
    """The row of a config's or a spec's method."""
    return method_named(obj.method)


def method_of_peft_type(peft_type: Any) -> Method:
    """The row of PEFT ``peft_type`` (any case); `ConfigError` naming the known types."""
    pt = str(peft_type).upper() if isinstance(peft_type, str) else None
    for m in METHODS.values():
        if m.peft_type == pt:
            return m
    raise fail("peft_type", peft_type, f"unsupported; peftjax reads {sorted(PEFT_TYPES)}.")


def config_from_dict(d: Mapping[str, Any]) -> AdapterConfig:
    """Builds the right config class from a parsed `adapter_config.json`, by its `peft_type`.

    PEFT fields that do not change the math and keys unknown to PEFT are ignored (as PEFT
    ignores them); the other fields are checked as the config class checks them.

    Args:
      d: the parsed ``adapter_config.json`` (PEFT's or peftjax's), with a ``peft_type`` key
        (any case): ``"LORA"``, ``"LOHA"``, ``"LOKR"``, ``"IA3"``, ``"ADALORA"``...

    Returns:
      An instance of the matching config class (``LoraConfig``, ``LoKrConfig``, ...).

    Raises:
      ConfigError: ``d`` is not a mapping; a missing or unknown ``peft_type``; an invalid
        field value; a math-changing PEFT field peftjax does not implement set to a
        non-default value.

    Example:

      >>> import peftjax as pj
      >>> cfg = pj.config_from_dict({"peft_type": "LOKR", "r": 4, "target_modules": ["fc"]})
      >>> type(cfg).__name__, cfg.r, cfg.target_modules
      ('LoKrConfig', 4, ('fc',))
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"expected a dict parsed from adapter_config.json, got {d!r}.")
    return method_of_peft_type(d.get("peft_type")).config.from_dict(d)


def is_modules_to_save(spec: Spec) -> bool:
    """``spec`` is a ``modules_to_save`` copy (`modules_to_save_spec`), not a method's own."""
    return isinstance(spec, CopySpec) and spec.kind == "modules_to_save"


def modules_to_save_spec(shape: tuple[int, ...]) -> Spec:
    """The spec of a ``modules_to_save`` copy of a leaf (every method has them)."""
    return CopySpec(
        layout=Layout("dense"), shape=tuple(shape), scaling=(1.0,), kind="modules_to_save"
    )
