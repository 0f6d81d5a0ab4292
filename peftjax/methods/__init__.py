"""One module per method: its static spec, its PEFT-exact init, delta, merge and forward rule."""

from .base import Spec
from .ia3 import IA3BiasSpec, IA3Spec
from .loha import LoHaSpec
from .lokr import LoKrSpec, factorization
from .lora import LoraSpec
from .swap import CopySpec

__all__ = [
    "CopySpec",
    "IA3BiasSpec",
    "IA3Spec",
    "LoHaSpec",
    "LoKrSpec",
    "LoraSpec",
    "Spec",
    "factorization",
]
