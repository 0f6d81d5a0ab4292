"""P-tuning (PEFT's ``PromptEncoderConfig``, ``tuners/p_tuning``): virtual tokens produced by a
trainable prompt encoder, prepended as prompt tuning's (the ``"tokens"`` route of
`peftjax.methods.prompt`).

Arrays while training: ``embedding.weight [T, D]`` (N(0, 1)) and the encoder's parameters in
torch layout under their torch names (`peftjax.methods._encoders`): an MLP (``mlp_head.0/2/4``,
the default) or a bidirectional LSTM (``lstm_head.*``) and its MLP head, torch's math exactly
(gate order i, f, g, o; two biases). The virtual tokens are ``encoder(embedding)``, recomputed
at every call (differentiable end to end); ``encoder_dropout`` (LSTM only, between layers) acts
when `pj.apply` is given an ``rng`` (training), as PEFT's train mode.

Files: PEFT saves only ``prompt_embeddings`` = the encoder's output (eval mode), never the
encoder. So does `pj.save_pretrained`; a loaded adapter holds that output (`loaded_spec`), as
PEFT's loaded model does (an embedding, no encoder), and trains it directly if asked.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..config import check_dropout, fail
from . import _encoders as E
from .prompt import PromptLearningConfig, PromptSpec, positive_int

__all__ = ["PromptEncoderConfig", "PromptEncoderSpec"]

_TYPES = ("MLP", "LSTM")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: a prompt encoder (MLP or LSTM) reparameterises the virtual tokens.

    Attributes:
      (shared: common prompt)
      num_virtual_tokens: (shared)
      token_dim: (shared)
      num_transformer_submodules: (shared)
      num_attention_heads: (shared)
      num_layers: (shared)
      encoder_reparameterization_type: the prompt encoder: ``"MLP"`` (default) or ``"LSTM"`` (any
        case, stored upper-case).
      encoder_hidden_size: the encoder's hidden size; ``None``: ``token_dim``.
      encoder_num_layers: the LSTM's number of layers (an MLP always has 2: another value warns, as
        PEFT).
      encoder_dropout: the LSTM's dropout probability while training.

    Example:

      >>> PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16).method
      'p_tuning'
      >>> cfg = PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="lstm")
      >>> cfg.encoder_reparameterization_type, cfg.method_label
      ('LSTM', 'p_tuning(lstm)')
    """

    peft_type: ClassVar[str] = "P_TUNING"
    method: ClassVar[str] = "p_tuning"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.encoder_reparameterization_type
        t = getattr(t, "value", t)  # PEFT's enum
        if not isinstance(t, str) or t.upper() not in _TYPES:
            raise fail("encoder_reparameterization_type", t, f"must be one of {list(_TYPES)}.")
        self._set("encoder_reparameterization_type", t.upper())
        positive_int("encoder_hidden_size", self.encoder_hidden_size, optional=True)
        positive_int("encoder_num_layers", self.encoder_num_layers)
        check_dropout("encoder_dropout", self.encoder_dropout)

    @property
    def method_label(self) -> str:
        return f"p_tuning({self.encoder_reparameterization_type.lower()})"

    def module_spec(self, path, layout, shape, mask):
        if self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != 2:
            warnings.warn(
                f"for MLP, the argument `encoder_num_layers` is ignored (got "
                f"{self.encoder_num_layers}). Exactly 2 MLP layers are used.",
                UserWarning,
                stacklevel=4,
            )
        return PromptEncoderSpec(layout=layout, shape=tuple(shape), scaling=(1.0,), config=self)


@dataclasses.dataclass(frozen=True)
class PromptEncoderSpec(PromptSpec):
    @property
    def hidden(self) -> int:
        return int(self.config.encoder_hidden_size or self.shape[1])

    def describe(self) -> str:
        kind = self.config.encoder_reparameterization_type.lower()
        return f"p_tuning({kind}, T={self.n_tokens}{', loaded' if self.loaded else ''})"

    def init_layer(self, key, w_layer, scale, dtype):
        ke, kh = jax.random.split(key)
        d, cfg = self.shape[1], self.config
        if cfg.encoder_reparameterization_type == "MLP":
            head = E.init_mlp_encoder(kh, d, self.hidden)
        else:
            head = E.init_lstm_encoder(kh, d, self.hidden, cfg.encoder_num_layers)
        out = {"embedding.weight": jax.random.normal(ke, (self.n_tokens, d), dtype)}
        out.update({k: v.astype(dtype) for k, v in head.items()})
        return out

    def encode(self, arrays, rng=None):
        """``[T, D]`` float32: the encoder applied to the embedding (the saved output)."""
        if self.loaded:
            return arrays["prompt_embeddings"].astype(jnp.float32)
        x = arrays["embedding.weight"]
        head = {k: v for k, v in arrays.items() if k != "embedding.weight"}
        cfg = self.config
        if cfg.encoder_reparameterization_type == "MLP":
            return E.mlp_encoder(head, x)
        return E.lstm_encoder(head, x, cfg.encoder_num_layers, cfg.encoder_dropout, rng)

    def virtual_rows(self, arrays, rng=None):
        return self.encode(arrays, rng)[None]

    def file_tensors(self, arrays, module):
        return {"prompt_embeddings": np.asarray(self.encode(arrays), np.float32)}

    def loaded_spec(self):
        return dataclasses.replace(self, loaded=True)

    def arrays_from_file(self, tensors, module, used, dtype):
        return {"prompt_embeddings": self.prompt_from_file(tensors, used, dtype)}
