"""How one Flax array is stored in torch layout in a PEFT file: a `Rule` per array.

Inside peftjax every array is in Flax orientation (``in`` before ``out``, conv kernels
``(*spatial, in, out)``); PEFT's files hold torch layouts. The rules are named values:

==================  ==============================================  ===========================
rule                Flax                                            torch
==================  ==============================================  ===========================
`SAME`              any                                             the same
`TRANSPOSE`         ``(a, b)``                                      ``(b, a)``
`CONV`              ``(*spatial, x, y)``                            ``(y, x, *spatial)``
`conv_1x1(nsp)`     ``(r, out)``                                    ``(out, r, 1, ..)``
`COLUMN`            ``(n,)``                                        ``(n, 1)``
`ROW`               ``(n,)``                                        ``(1, n)``
`conv_vector(nsp)`  ``(n,)``                                        ``(1, n, 1, ..)``
==================  ==============================================  ===========================
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

__all__ = [
    "COLUMN",
    "CONV",
    "ROW",
    "SAME",
    "TRANSPOSE",
    "Rule",
    "RuleKind",
    "conv_1x1",
    "conv_vector",
    "leaf_rule",
]


class RuleKind(enum.Enum):
    SAME = "same"
    TRANSPOSE = "transpose"
    CONV = "conv"
    CONV_1X1 = "conv_1x1"
    COLUMN = "column"
    ROW = "row"
    CONV_VECTOR = "conv_vector"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One array's torch layout: ``kind`` and, for the 1x1 conv forms, ``nsp`` spatial dims."""

    kind: RuleKind
    nsp: int = 0

    def torch_shape(self, s: tuple[int, ...]) -> tuple[int, ...]:
        k, ones = self.kind, (1,) * self.nsp
        if k is RuleKind.TRANSPOSE:
            return tuple(reversed(s))
        if k is RuleKind.CONV:
            return (s[-1], s[-2], *s[:-2])
        if k is RuleKind.CONV_1X1:
            return (s[1], s[0], *ones)
        if k is RuleKind.COLUMN:
            return (s[0], 1)
        if k is RuleKind.ROW:
            return (1, s[0])
        if k is RuleKind.CONV_VECTOR:
            return (1, s[0], *ones)
        return tuple(s)

    def flax_shape(self, t: tuple[int, ...]) -> tuple[int, ...]:
        """Inverse of `torch_shape`."""
        k = self.kind
        if k is RuleKind.TRANSPOSE:
            return tuple(reversed(t))
        if k is RuleKind.CONV:
            return (*t[2:], t[1], t[0])
        if k is RuleKind.CONV_1X1:
            return (t[1], t[0])
        if k is RuleKind.COLUMN:
            return (t[0],)
        if k in (RuleKind.ROW, RuleKind.CONV_VECTOR):
            return (t[1],)
        return tuple(t)

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        k = self.kind
        if k is RuleKind.TRANSPOSE:
            return a.T
        if k is RuleKind.CONV:
            return np.transpose(a, (a.ndim - 1, a.ndim - 2, *range(a.ndim - 2)))
        if k is RuleKind.CONV_1X1:
            return a.T.reshape(self.torch_shape(a.shape))
        return a.reshape(self.torch_shape(a.shape))

    def from_torch(self, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        k = self.kind
        if k is RuleKind.TRANSPOSE:
            return t.T
        if k is RuleKind.CONV:
            return np.transpose(t, (*range(2, t.ndim), 1, 0))
        if k is RuleKind.CONV_1X1:
            return t.reshape(t.shape[:2]).T
        return t.reshape(shape)


SAME = Rule(RuleKind.SAME)
TRANSPOSE = Rule(RuleKind.TRANSPOSE)
CONV = Rule(RuleKind.CONV)
COLUMN = Rule(RuleKind.COLUMN)
ROW = Rule(RuleKind.ROW)


def conv_1x1(nsp: int) -> Rule:
    """``(r, out)`` <-> a torch 1x1 conv weight ``(out, r, 1, ..)`` with ``nsp`` spatial dims."""
    return Rule(RuleKind.CONV_1X1, nsp)


def conv_vector(nsp: int) -> Rule:
    """``(n,)`` <-> ``(1, n, 1, ..)`` with ``nsp`` spatial dims."""
    return Rule(RuleKind.CONV_VECTOR, nsp)


def leaf_rule(leaf_name: str, shape: tuple[int, ...]) -> Rule:
    """Torch layout of a whole leaf (modules_to_save / LN tuning copies, base layers)."""
    if leaf_name == "kernel" and len(shape) == 2:
        return TRANSPOSE
    if leaf_name == "kernel" and len(shape) >= 3:
        return CONV
    return SAME
