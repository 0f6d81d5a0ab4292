"""The LyCORIS config base that LoHa and LoKr share (PEFT's ``LycorisConfig``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from ..config import (
    AdapterConfig,
    FrozenDict,
    check_alpha,
    check_bool,
    check_dropout,
    check_rank,
    pattern_field,
)
from .base import RankedConfig, one_value, ranked_fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class LycorisConfig(RankedConfig, AdapterConfig):
    """Fields and rules LoHa and LoKr share (PEFT's ``LycorisConfig``)."""

    r: int = 8
    alpha: int | float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool | str = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    rank_pattern: FrozenDict[int] = dataclasses.field(default_factory=FrozenDict)
    alpha_pattern: FrozenDict[int | float] = dataclasses.field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank("r", self.r)
        check_alpha("alpha", self.alpha)
        check_dropout("rank_dropout", self.rank_dropout)
        check_dropout("module_dropout", self.module_dropout)
        check_bool("use_effective_conv2d", self.use_effective_conv2d)
        # PEFT does not forbid layers_* with a str target_modules here (unlike LoRA): matching
        # then ignores them, as PEFT's `check_target_module_exists` does.
        self._check_layers(str_targets_forbidden=False)
        self._set("rank_pattern", pattern_field("rank_pattern", self.rank_pattern, check_rank))
        self._set("alpha_pattern", pattern_field("alpha_pattern", self.alpha_pattern, check_alpha))

    def scaling(self, r: int, alpha: float) -> float:
        """PEFT's LyCORIS scale for rank `r` and alpha `alpha`: `alpha / r`."""
        check_rank("r", r)
        return alpha / r

    @staticmethod
    def lycoris_fields(entries: list) -> dict[str, Any]:
        """The fields `from_specs` rebuilds for LoHa and LoKr alike."""
        return dict(
            **ranked_fields(entries, "alpha"),
            rank_dropout=one_value(entries, "rank_dropout", lambda s: s.rank_dropout),
            module_dropout=one_value(entries, "module_dropout", lambda s: s.module_dropout),
            init_weights=one_value(entries, "init_weights", lambda s: s.init_weights),
        )

    @staticmethod
    def big_convs(entries: list) -> list:
        """The entries on conv kernels larger than 1x1: PEFT's ``use_effective_conv2d`` flag
        only matters for those."""
        return [
            e
            for e in entries
            if e.spec.layout.kind == "conv" and math.prod(e.spec.layout.spatial(e.spec.shape)) > 1
        ]
