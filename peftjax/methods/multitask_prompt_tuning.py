"""Multitask prompt tuning (PEFT's ``MultitaskPromptTuningConfig``, ``tuners/
multitask_prompt_tuning``): one shared prompt, modulated per task by a rank-``r`` matrix.

Arrays: ``prompt_embeddings`` P ``[T, D]`` (prompt-tuning init), ``prefix_task_cols [n_tasks,
T, r]`` and ``prefix_task_rows [n_tasks, r, D]``, both N(0, 0.02). Example ``b`` of task
``t = task_ids[b]`` gets the virtual tokens ``P * (cols[t] @ rows[t])`` (elementwise), so
`pj.prompt_inputs` needs ``task_ids`` (PEFT needs them too, also to generate). Files hold the raw
P (not multiplied) and both task arrays, under their bare names.

Inits (``prompt_tuning_init``): ``RANDOM`` and ``TEXT`` as prompt tuning (see
`peftjax.methods.prompt_tuning`), and from a source multitask checkpoint at
``prompt_tuning_init_state_dict_path`` (a ``.safetensors`` file; pickled ``.bin`` / ``.pt``
files are refused): ``AVERAGE_SOURCE_TASKS`` (source P, task arrays averaged over the source
tasks), ``EXACT_SOURCE_TASK`` (source P and task ``prompt_tuning_init_task``'s arrays), both
into ``num_tasks=1`` (PEFT's strict load), and ``ONLY_SOURCE_SHARED`` (source P, random task
arrays). The source is read when the adapter is injected for training only (never when a file is
loaded: PEFT skips it in inference mode too, and a path inside a loaded file is not followed).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ..config import check_opt_str, fail, is_int
from ..errors import FormatError
from .prompt import check_file_shape, positive_int
from .prompt_tuning import PromptTuningConfig, PromptTuningSpec, init_prompt_rows

__all__ = ["MultitaskPromptTuningConfig", "MultitaskPromptTuningSpec"]

_SOURCE = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
_TASK_KEYS = ("prefix_task_cols", "prefix_task_rows")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning: a shared prompt times each task's ``cols @ rows``.

    Attributes:
      (shared: common prompt)
      num_virtual_tokens: (shared)
      token_dim: (shared)
      num_transformer_submodules: (shared)
      num_attention_heads: (shared)
      num_layers: (shared)
      prompt_tuning_init: as prompt tuning's (``"RANDOM"``, ``"TEXT"``), or
        ``"AVERAGE_SOURCE_TASKS"``, ``"EXACT_SOURCE_TASK"``, ``"ONLY_SOURCE_SHARED"``: start from a
        source checkpoint's prompts (``prompt_tuning_init_state_dict_path``).
      prompt_tuning_init_text: (shared)
      tokenizer_name_or_path: (shared)
      tokenizer_kwargs: (shared)
      prompt_tuning_init_ids: (shared)
      prompt_tuning_init_state_dict_path: the source checkpoint of the ``*SOURCE*`` inits: a
        ``.safetensors`` file (peftjax never loads pickles).
      prompt_tuning_init_task: the source task of ``"EXACT_SOURCE_TASK"`` (an int >= 0).
      num_ranks: the rank of each task's ``prefix_task_cols @ prefix_task_rows``.
      num_tasks: the number of tasks (each gets its own ``cols @ rows``).

    Example:

      >>> MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=3, num_ranks=2).num_tasks
      3
    """

    peft_type: ClassVar[str] = "MULTITASK_PROMPT_TUNING"
    method: ClassVar[str] = "multitask_prompt_tuning"
    inits: ClassVar[tuple[str, ...]] = ("RANDOM", "TEXT") + _SOURCE

    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int = 0
    num_ranks: int = 1
    num_tasks: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("num_ranks", self.num_ranks)
        positive_int("num_tasks", self.num_tasks)
        check_opt_str("prompt_tuning_init_state_dict_path", self.prompt_tuning_init_state_dict_path)
        t = self.prompt_tuning_init_task
        if not is_int(t) or t < 0:
            raise fail("prompt_tuning_init_task", t, "must be an int >= 0.")
        init = self.prompt_tuning_init
        if init in _SOURCE and not self.inference_mode:
            path = self.prompt_tuning_init_state_dict_path
            if path is None:
                raise fail(
                    "prompt_tuning_init_state_dict_path",
                    None,
                    f"`prompt_tuning_init={init!r}` needs the source checkpoint's path.",
                )
            if not str(path).endswith(".safetensors"):
                raise fail(
                    "prompt_tuning_init_state_dict_path",
                    path,
                    "must be a `.safetensors` file (peftjax never loads pickled checkpoints).",
                )
            if init != "ONLY_SOURCE_SHARED" and self.num_tasks != 1:
                raise fail(
                    "num_tasks",
                    self.num_tasks,
                    f"`prompt_tuning_init={init!r}` loads one task's arrays (PEFT's strict "
                    "load): use num_tasks=1.",
                )

    def module_spec(self, path, layout, shape, mask):
        return MultitaskPromptTuningSpec(
            layout=layout, shape=tuple(shape), scaling=(1.0,), config=self
        )


def _read_source(config, shape_p, r: int):
    """``(P, cols, rows)`` of the source checkpoint (module docstring)."""
    from .._safetensors import read_safetensors

    path = config.prompt_tuning_init_state_dict_path
    try:
        tensors, _ = read_safetensors(path)
    except OSError as e:
        raise FormatError(
            f"`prompt_tuning_init_state_dict_path`: cannot read `{path}`: {e.strerror or e}."
        ) from None
    need = ("prompt_embeddings",) + (_TASK_KEYS if config.prompt_tuning_init != _SOURCE[2] else ())
    for k in need:
        if k not in tensors:
            raise FormatError(f"`{path}` (the multitask source checkpoint) lacks `{k}`.")
    p = np.asarray(tensors["prompt_embeddings"], np.float32)
    check_file_shape("prompt_embeddings", p.shape, shape_p, f"`{path}`")
    if config.prompt_tuning_init == _SOURCE[2]:
        return p, None, None
    cols = np.asarray(tensors["prefix_task_cols"], np.float32)
    rows = np.asarray(tensors["prefix_task_rows"], np.float32)
    check_file_shape("prefix_task_cols", cols.shape[1:], (shape_p[0], r), f"`{path}`")
    check_file_shape("prefix_task_rows", rows.shape[1:], (r, shape_p[1]), f"`{path}`")
    if config.prompt_tuning_init == _SOURCE[0]:
        return p, cols.mean(0, keepdims=True), rows.mean(0, keepdims=True)
    t = config.prompt_tuning_init_task
    if t >= cols.shape[0]:
        raise fail(
            "prompt_tuning_init_task", t, f"the source checkpoint has {cols.shape[0]} tasks."
        )
    return p, cols[t : t + 1], rows[t : t + 1]


@dataclasses.dataclass(frozen=True)
class MultitaskPromptTuningSpec(PromptTuningSpec):
    needs_task_ids: ClassVar[bool] = True

    @property
    def groups(self) -> int:
        return int(self.config.num_tasks)

    def _shapes(self):
        n, t, r, d = self.config.num_tasks, self.n_tokens, self.config.num_ranks, self.shape[1]
        return {"prefix_task_cols": (n, t, r), "prefix_task_rows": (n, r, d)}

    def init_layer(self, key, w_layer, scale, dtype):
        kp, kc, kr = jax.random.split(key, 3)
        shapes = self._shapes()
        cfg = self.config
        out = {
            "prompt_embeddings": init_prompt_rows(cfg, kp, w_layer, self.n_tokens, dtype),
            "prefix_task_cols": 0.02 * jax.random.normal(kc, shapes["prefix_task_cols"], dtype),
            "prefix_task_rows": 0.02 * jax.random.normal(kr, shapes["prefix_task_rows"], dtype),
        }
        if cfg.prompt_tuning_init in _SOURCE and not cfg.inference_mode:
            p, cols, rows = _read_source(cfg, (self.n_tokens, self.shape[1]), cfg.num_ranks)
            out["prompt_embeddings"] = jnp.asarray(p, dtype)
            if cols is not None:
                out["prefix_task_cols"] = jnp.asarray(cols, dtype)
                out["prefix_task_rows"] = jnp.asarray(rows, dtype)
        return out

    def virtual_rows(self, arrays, rng=None):
        p = arrays["prompt_embeddings"].astype(jnp.float32)
        cols = arrays["prefix_task_cols"].astype(jnp.float32)
        rows = arrays["prefix_task_rows"].astype(jnp.float32)
        return p[None] * jnp.matmul(cols, rows)  # [n_tasks, T, D]

    def file_tensors(self, arrays, module):
        out = super().file_tensors(arrays, module)
        for k in _TASK_KEYS:
            out[k] = np.asarray(arrays[k], np.float32)
        return out

    def arrays_from_file(self, tensors, module, used, dtype):
        out = super().arrays_from_file(tensors, module, used, dtype)
        for k, want in self._shapes().items():
            out[k] = self.prompt_from_file(tensors, used, dtype, key=k, want=want)
        return out
