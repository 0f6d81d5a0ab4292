"""What the prompt-learning methods share (PEFT's ``PromptLearningConfig`` family): prompt tuning,
p-tuning, prefix tuning and multitask prompt tuning; adaption prompt reuses the spec base.

They act on activations, not on weights, and reach an unchanged model by one of three routes (a
spec's `PromptSpec.route`):

* ``"tokens"`` (prompt tuning, p-tuning, multitask prompt tuning): PEFT prepends ``T`` virtual
  token embeddings to ``inputs_embeds``. Flax models take ``input_ids``, and their token
  embedding is a row gather of a table, which `pj.apply` sees. So `pj.prompt_inputs` prepends
  ``T`` *virtual ids* ``V + g*T + k`` (``V`` = the table's rows, ``k`` = 0..T-1, ``g`` = the
  example's prompt group: its task for multitask prompt tuning, else 0) and extends the
  attention mask and labels as PEFT does; `pj.apply` then gathers those ids from ``[E; P]``,
  the table with the method's virtual rows (`PromptSpec.virtual_rows`, ``[groups, T, D]``)
  appended, cast to the table's dtype. Any model whose token embedding is a table lookup (linen
  ``nn.Embed``, nnx ``Embed``, transformers' Flax Llama / GPT-2 / BERT) works unchanged.
  Positions are the model's default ``arange(T + N)``, PEFT's (it drops ``position_ids``).
* ``"prefix"`` (prefix tuning): per-layer keys and values handed to the model as a pre-filled
  KV cache, unrotated, with the real tokens at positions ``T..T+N-1`` (PEFT's
  ``past_key_values``): `pj.prompt_inputs(..., model=model)` builds the cache of transformers'
  Flax models, or passes ``prefix_key_values`` to a model whose ``__call__`` takes that keyword.
* ``"attention"`` (adaption prompt): `pj.apply` wraps the targeted attention modules.

Where the adapter lives: a `PROMPT`-role spec on one leaf. Token and prefix methods sit on the
*word embedding table* (PEFT: the backbone parameter with ``vocab_size`` rows): the leaf named by
``target_modules`` when given (one module), else the one embedding table whose module is named
like a token embedding (``embed_tokens``, ``wte``, ``word_embeddings``...), else the only
embedding table of the tree. The leaf keeps its base value: the spec changes nothing until
`pj.prompt_inputs` and `pj.apply` use it. Prompt adapters cannot merge (`pj.merge` raises
`MergeError` naming the method, as PEFT has no merge for them).

Files are PEFT's: bare keys (``prompt_embeddings``, ``prefix_task_cols`` / ``prefix_task_rows``),
not under a module path (`PromptSpec.file_tensors`); PEFT saves the *encoder output* for p-tuning
and projected prefix tuning (the encoder's own weights are never saved), so a loaded adapter of
those methods holds that output (`PromptSpec.loaded`), as PEFT's loaded model does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from ..config import AdapterConfig, check_bool, fail, is_int
from ..errors import ConfigError, FormatError, ShapeError, TargetError
from .base import PROMPT, Spec

__all__ = [
    "TOKEN_EMBEDDING_NAMES",
    "PromptLearningConfig",
    "PromptSpec",
    "check_file_shape",
    "find_word_embedding",
    "positive_int",
]

#: Module names of token embeddings in common models (Llama, GPT-2, BERT, GPT-NeoX, T5...).
TOKEN_EMBEDDING_NAMES = (
    "embed_tokens",
    "wte",
    "word_embeddings",
    "tok_embeddings",
    "token_embedding",
    "embed_in",
    "shared",
    "embed",
)


def positive_int(name: str, v: Any, *, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if not is_int(v) or v <= 0:
        raise fail(name, v, "must be a positive int" + (" or None." if optional else "."))
    return int(v)


def find_word_embedding(config: AdapterConfig, groups: Mapping[str, list], layouts) -> tuple:
    """``(module path, leaf)`` of the word embedding table (module docstring's rule)."""
    from .._tree import weight_leaf
    from ..layout import given_layout

    tables = []
    for mod, group in groups.items():
        w = weight_leaf(group)
        if w is None or len(getattr(w.base, "shape", ())) != 2:
            continue
        lay = given_layout(layouts, mod, w.base)
        if (lay is not None and lay.kind == "embed") or (lay is None and w.name == "embedding"):
            tables.append((mod, w))
    tm = config.target_modules
    if tm is not None:
        names = [tm] if isinstance(tm, str) else list(tm)
        hits = [
            (m, w)
            for m, w in tables
            if any(re.fullmatch(n, m) or m == n or m.endswith("." + n) for n in names)
        ]
        if len(hits) != 1:
            raise TargetError(
                f"{type(config).__name__}: `target_modules={tm!r}` must name exactly one "
                f"embedding table (the word embedding); it matched {[m for m, _ in hits]}. The "
                f"tree's embedding tables: {[m for m, _ in tables]}."
            )
        return hits[0]
    if not tables:
        raise TargetError(
            f"{type(config).__name__}: the tree has no embedding table (a 2-D leaf named "
            "`embedding`, or one read as `pj.Layout('embed')`): prompt methods prepend virtual "
            "tokens to the word embedding. Name it with `target_modules=[<module>]` and "
            "`layouts={<module>: pj.Layout('embed')}`."
        )
    named = [(m, w) for m, w in tables if m.split(".")[-1] in TOKEN_EMBEDDING_NAMES]
    pick = named if named else tables
    if len(pick) != 1:
        raise TargetError(
            f"{type(config).__name__}: cannot tell which embedding table is the word embedding "
            f"among {[m for m, _ in pick]}; name it with `target_modules=[<module>]`."
        )
    return pick[0]


def check_file_shape(key: str, got: tuple, want: tuple, where: str) -> None:
    if tuple(got) != tuple(want):
        raise ShapeError(
            f"{where}: tensor `{key}` has shape {list(got)}, but the model and the adapter's "
            f"config need {list(want)}."
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptLearningConfig(AdapterConfig):
    """PEFT's ``PromptLearningConfig`` fields. Not used directly.

    ``num_virtual_tokens`` is required. ``token_dim`` (PEFT: the model's hidden size) is read
    from the word embedding when ``None``; a given one must match it. ``num_layers`` and
    ``num_attention_heads`` are metadata except for prefix tuning. ``num_transformer_submodules``
    (PEFT: 2 for encoder-decoder models) must be ``None`` or 1: peftjax's prompt methods serve
    decoder-only and encoder-only models. ``target_modules`` (not a PEFT field of these configs,
    and written to the file only when set) names the word embedding module when the tree's is
    not found by name. ``task_type="SEQ_CLS"`` adds PEFT's classifier heads (``classifier``,
    ``score``) to ``modules_to_save``, as PEFT does, so the head trains with the prompt.
    """

    route: ClassVar[str] = "tokens"

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None:
            raise fail(
                "num_virtual_tokens", None, "is required: the number of virtual tokens (> 0)."
            )
        positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for f in ("token_dim", "num_attention_heads", "num_layers"):
            positive_int(f, getattr(self, f), optional=True)
        nts = self.num_transformer_submodules
        if nts is not None and nts != 1:
            raise fail(
                "num_transformer_submodules",
                nts,
                "peftjax's prompt methods serve decoder-only and encoder-only models (1 "
                "submodule); encoder-decoder prompts (2) are not supported.",
            )
        check_bool("inference_mode", self.inference_mode)
        if self.task_type == "SEQ_CLS":
            heads = ("classifier", "score")
            have = tuple(self.modules_to_save or ())
            self._set("modules_to_save", have + tuple(h for h in heads if h not in have))
        elif self.task_type not in (None, "CAUSAL_LM", "FEATURE_EXTRACTION", "TOKEN_CLS"):
            raise fail(
                "task_type",
                self.task_type,
                "peftjax's prompt methods support CAUSAL_LM, SEQ_CLS, TOKEN_CLS and "
                "FEATURE_EXTRACTION (SEQ_2_SEQ_LM and QUESTION_ANS need encoder-decoder / span "
                "handling PEFT does separately).",
            )

    # ---- hooks -----------------------------------------------------------------------------
    def plan_targets(self, groups, layouts) -> list:
        """The one leaf the adapter sits on: the word embedding table."""
        from .._plan import Planned
        from ..layout import Layout

        mod, w = find_word_embedding(self, groups, layouts)
        d = int(w.base.shape[1])
        if self.token_dim is not None and self.token_dim != d:
            raise ShapeError(
                f"`token_dim`={self.token_dim}: the word embedding `{mod}` has width {d}."
            )
        return [Planned(mod, [w], w, Layout("embed"), None)]

    @property
    def total_virtual_tokens(self) -> int:
        n, subs = self.num_virtual_tokens, self.num_transformer_submodules
        if n is None:
            raise ConfigError("`num_virtual_tokens` is not set.")
        return int(n) * int(subs or 1)

    def file_config(self, spec: Spec) -> PromptLearningConfig:
        """The config a file holds for ``spec`` (PEFT writes the model's sizes)."""
        return dataclasses.replace(self, token_dim=spec.shape[1], num_transformer_submodules=1)

    @classmethod
    def from_specs(cls, entries, common):
        raise NotImplementedError  # prompt adapters save their own config (`file_config`)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for f in ("target_modules", "exclude_modules"):
            if out.get(f) is None:
                out.pop(f, None)  # not fields of PEFT's prompt-learning configs
        return out


@dataclasses.dataclass(frozen=True)
class PromptSpec(Spec):
    """A prompt-learning adapter on the leaf it sits on (module docstring). ``config`` is the
    adapter's config (hashable; the file is written from it); ``loaded``: the arrays are what a
    PEFT file holds (`loaded_spec`), not the trainable encoder's parameters."""

    config: Any = None
    loaded: bool = False

    role: ClassVar[str] = PROMPT
    factored: ClassVar[bool] = False
    #: `pj.prompt_inputs` requires ``task_ids`` (multitask prompt tuning)
    needs_task_ids: ClassVar[bool] = False

    @property
    def method(self) -> str:  # type: ignore[override]
        return self.config.method

    @property
    def route(self) -> str:
        return self.config.route

    @property
    def n_tokens(self) -> int:
        return self.config.total_virtual_tokens

    @property
    def groups(self) -> int:
        """Prompt groups in `virtual_rows` (tasks for multitask prompt tuning)."""
        return 1

    def describe(self) -> str:
        return f"{self.method}(T={self.n_tokens})"

    def sharding_roles(self):
        """Prompt arrays are tiny and read whole by every example: replicated."""
        return {}

    # the weight the spec sits on is never changed: merge rules are the identity, so that
    # `pj.apply`'s other uses of the table (a tied ``lm_head``) see the base weight
    def merge_layer(self, w32, arrays, scale):
        return w32, arrays

    def unmerge_layer(self, w32, arrays, scale):
        return w32, arrays

    def linear_forward(self, x2, y2, arrays, w2, scale, rng):
        return y2

    def check_config(self, config) -> None:
        """A ``config=`` given to `save_pretrained` must be this adapter's."""
        mine = self.config.file_config(self)
        if type(config) is not type(mine) or config.to_dict() != {
            **mine.to_dict(),
            "inference_mode": config.inference_mode,
        }:
            raise ConfigError(
                f"`config` ({config!r}) does not describe the adapter that is saved "
                f"({mine!r}); leave `config=None` for prompt adapters."
            )

    # ---- to implement ----------------------------------------------------------------------
    def virtual_rows(self, arrays, rng=None):
        """``[groups, T, D]`` float32 virtual token embeddings (``"tokens"`` route)."""
        raise NotImplementedError

    def file_tensors(self, arrays, module: str) -> dict[str, np.ndarray]:
        """``{file key: float32 array}`` as PEFT saves the adapter (``module``: the PEFT path of
        the module the spec sits on, for methods whose keys are per module)."""
        raise NotImplementedError

    def loaded_spec(self) -> PromptSpec:
        """The spec of the adapter as loaded from its file (default: the same)."""
        return self

    def arrays_from_file(self, tensors, module: str, used: set, dtype) -> dict:
        """This spec's arrays from a file's tensors (``used`` collects the keys read); raises
        `FormatError` / `ShapeError` naming the key."""
        raise NotImplementedError

    # ---- shared helpers ----------------------------------------------------------------------
    def prompt_from_file(self, tensors, used: set, dtype, key="prompt_embeddings", want=None):
        """Tensor ``key`` of a file, checked to have shape ``want`` (default ``[T, D]``)."""
        want = (self.n_tokens, self.shape[1]) if want is None else tuple(want)
        if key not in tensors:
            raise FormatError(f"adapter file: missing tensor `{key}` {list(want)}.")
        t = tensors[key]
        check_file_shape(key, t.shape, want, f"{self.method} adapter file")
        used.add(key)
        return jnp.asarray(np.asarray(t, np.float32), dtype)
