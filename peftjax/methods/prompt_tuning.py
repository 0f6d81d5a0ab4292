"""Prompt tuning (PEFT's ``PromptTuningConfig``, ``tuners/prompt_tuning``): ``T`` trainable
embeddings prepended to the input embeddings (the ``"tokens"`` route of `peftjax.methods.
prompt`).

One array: ``prompt_embeddings [T, D]`` (PEFT's ``prompt_encoder.<name>.embedding.weight``, saved
under the bare key ``prompt_embeddings``). Inits (``prompt_tuning_init``):

* ``"RANDOM"`` (default): N(0, 1), torch's ``nn.Embedding`` init.
* ``"SAMPLE_VOCAB"``: rows of the word embedding at ``T`` uniformly drawn ids (PEFT's
  ``randint(0, vocab)``), in float32.
* ``"TEXT"``: rows of the word embedding at the tokens of ``prompt_tuning_init_text``. peftjax has
  no tokenizer, so give the ids: ``prompt_tuning_init_ids=tokenizer(text)["input_ids"]`` (PEFT
  tokenizes with special tokens, e.g. a BOS, included: pass the same ids). Fewer ids than ``T``
  are repeated and cut as PEFT does; more ids than ``T`` are an error (PEFT would silently drop
  the end of the text).

Routes, files and what cannot be done (merge): `peftjax.methods.prompt`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..config import FrozenDict, check_opt_str, fail, is_int
from .prompt import PromptLearningConfig, PromptSpec

__all__ = ["PromptTuningConfig", "PromptTuningSpec", "init_prompt_rows"]

_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


def _init_ids(v: Any) -> tuple[int, ...] | None:
    if v is None:
        return None
    try:
        ids = tuple(np.asarray(v).reshape(-1).tolist())
    except Exception:  # noqa: BLE001 - anything that is not a sequence of ints
        ids = None
    if not ids or not all(is_int(i) and i >= 0 for i in ids):
        raise fail("prompt_tuning_init_ids", v, "must be a non-empty sequence of token ids >= 0.")
    return ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` trainable embeddings before the input's.

    Attributes:
      (shared: common prompt)
      num_virtual_tokens: (shared)
      token_dim: (shared)
      num_transformer_submodules: (shared)
      num_attention_heads: (shared)
      num_layers: (shared)
      prompt_tuning_init: how the virtual tokens start: ``"RANDOM"`` (default), ``"SAMPLE_VOCAB"``
        (rows of the word embedding drawn at random) or ``"TEXT"`` (the embeddings of
        ``prompt_tuning_init_ids``, repeated to ``num_virtual_tokens``); any case, stored
        upper-case.
      prompt_tuning_init_text: (shared)
      tokenizer_name_or_path: (shared)
      tokenizer_kwargs: (shared)
      prompt_tuning_init_ids: (shared)

    Example:

      >>> PromptTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM").method
      'prompt_tuning'
      >>> PromptTuningConfig(num_virtual_tokens=8, task_type="SEQ_CLS").modules_to_save
      ('classifier', 'score')
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    method: ClassVar[str] = "prompt_tuning"
    #: init modes whose rows come from the model's word embedding
    inits: ClassVar[tuple[str, ...]] = _INITS

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: Any = None
    # peftjax: the token ids of ``prompt_tuning_init_text`` (``"TEXT"`` init). Init-time only:
    # not written to files (PEFT keeps only the text) and not part of the config's equality
    # (documented in the class's Attributes, so not a ``#:`` comment: autodoc would repeat it)
    prompt_tuning_init_ids: tuple[int, ...] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        init = self.prompt_tuning_init
        init = getattr(init, "value", init)  # PEFT's enum
        if not isinstance(init, str) or init.upper() not in self.inits:
            raise fail("prompt_tuning_init", init, f"must be one of {list(self.inits)}.")
        self._set("prompt_tuning_init", init.upper())
        check_opt_str("prompt_tuning_init_text", self.prompt_tuning_init_text)
        check_opt_str("tokenizer_name_or_path", self.tokenizer_name_or_path)
        if self.tokenizer_kwargs is not None:
            if not isinstance(self.tokenizer_kwargs, dict | FrozenDict):
                raise fail("tokenizer_kwargs", self.tokenizer_kwargs, "must be a dict or None.")
            self._set("tokenizer_kwargs", FrozenDict(self.tokenizer_kwargs))
        ids = _init_ids(self.prompt_tuning_init_ids)
        self._set("prompt_tuning_init_ids", ids)
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise fail(
                "tokenizer_kwargs",
                dict(self.tokenizer_kwargs),
                "only valid with `prompt_tuning_init='TEXT'` (PEFT's rule).",
            )
        if self.prompt_tuning_init == "TEXT":
            # PEFT's rule (its loader checks it too, so a file without them would not load)
            for f in ("tokenizer_name_or_path", "prompt_tuning_init_text"):
                if not getattr(self, f):
                    raise fail(
                        f,
                        getattr(self, f),
                        "`prompt_tuning_init='TEXT'` needs the init text and the tokenizer's "
                        "name (PEFT's rule; peftjax tokenizes nothing: give the ids as "
                        "`prompt_tuning_init_ids`).",
                    )
        if self.prompt_tuning_init == "TEXT" and ids is not None:
            if len(ids) > self.total_virtual_tokens:
                raise fail(
                    "prompt_tuning_init_ids",
                    f"<{len(ids)} ids>",
                    f"more ids than `num_virtual_tokens`={self.total_virtual_tokens}; shorten "
                    "the init text (PEFT would drop its end).",
                )

    def module_spec(self, path, layout, shape, mask):
        return PromptTuningSpec(layout=layout, shape=tuple(shape), scaling=(1.0,), config=self)

    def to_dict(self):
        out = super().to_dict()
        out.pop("prompt_tuning_init_ids", None)
        return out


def init_prompt_rows(config, key, table, n: int, dtype):
    """``[n, D]`` initial rows for ``config.prompt_tuning_init`` (RANDOM / SAMPLE_VOCAB / TEXT)
    from the word embedding ``table``: PEFT's prompt-tuning init, shared by multitask prompt
    tuning."""
    d = table.shape[1]
    init = config.prompt_tuning_init
    if init == "SAMPLE_VOCAB":
        ids = jax.random.randint(key, (n,), 0, table.shape[0])
        return jnp.asarray(table, jnp.float32)[ids].astype(dtype)
    if init == "TEXT" and config.prompt_tuning_init_ids is None and not config.inference_mode:
        raise fail(
            "prompt_tuning_init_ids",
            None,
            "`prompt_tuning_init='TEXT'` needs the token ids of the init text; peftjax has no "
            "tokenizer: pass `prompt_tuning_init_ids=tokenizer(text)['input_ids']` (special "
            "tokens included, as PEFT tokenizes).",
        )
    if init == "TEXT" and config.prompt_tuning_init_ids is not None:
        text_ids: Any = np.asarray(config.prompt_tuning_init_ids)
        if text_ids.max() >= table.shape[0]:
            raise fail(
                "prompt_tuning_init_ids",
                f"<max id {int(text_ids.max())}>",
                f"an id is beyond the word embedding's {table.shape[0]} rows.",
            )
        text_ids = np.tile(text_ids, math.ceil(n / len(text_ids)))[:n]
        return jnp.asarray(table, jnp.float32)[text_ids].astype(dtype)
    return jax.random.normal(key, (n, d), dtype)


@dataclasses.dataclass(frozen=True)
class PromptTuningSpec(PromptSpec):
    def init_layer(self, key, w_layer, scale, dtype):
        return {
            "prompt_embeddings": init_prompt_rows(self.config, key, w_layer, self.n_tokens, dtype)
        }

    def virtual_rows(self, arrays, rng=None):
        return arrays["prompt_embeddings"].astype(jnp.float32)[None]

    def file_tensors(self, arrays, module):
        return {"prompt_embeddings": np.asarray(arrays["prompt_embeddings"], np.float32)}

    def arrays_from_file(self, tensors, module, used, dtype):
        return {"prompt_embeddings": self.prompt_from_file(tensors, used, dtype)}
