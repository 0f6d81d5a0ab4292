"""peftjax: parameter-efficient fine-tuning for JAX/Flax as pure pytree transforms.

Adapters (every method of `peftjax.methods.METHODS`) live in the params tree; every transform
returns a new tree and leaves its input unchanged. The math and files are HF PEFT's.
"""

from .arithmetic import add_weighted_adapter as add_weighted_adapter
from .checkpoint import (
    AdapterCheckpointer as AdapterCheckpointer,
    CheckpointNotFoundError as CheckpointNotFoundError,
)
from .conversion import (
    convert_to_lora as convert_to_lora,
    inject_from_state_dict as inject_from_state_dict,
    save_as_lora as save_as_lora,
    supports_lora_conversion as supports_lora_conversion,
)
from .errors import (
    AdaptedArrayError as AdaptedArrayError,
    AdapterNameError as AdapterNameError,
    AdapterNameTypeError as AdapterNameTypeError,
    ArgumentTypeError as ArgumentTypeError,
    ConfigError as ConfigError,
    FormatError as FormatError,
    LayoutError as LayoutError,
    MergeError as MergeError,
    PartitionError as PartitionError,
    PeftJaxError as PeftJaxError,
    ShapeError as ShapeError,
    ShardingError as ShardingError,
    TargetError as TargetError,
    UnsupportedModuleError as UnsupportedModuleError,
)
from .forward import apply as apply
from .hotswap import hotswap as hotswap, prepare_hotswap as prepare_hotswap
from .io import (
    inspect_adapter as inspect_adapter,
    load_pretrained as load_pretrained,
    read_adapter as read_adapter,
    save_pretrained as save_pretrained,
    stacked_key_map as stacked_key_map,
)
from .layout import Layout as Layout
from .methods import (
    METHODS as METHODS,
    config_from_dict as config_from_dict,
    factorization as factorization,
)
from .node import Adapted as Adapted
from .prompt import prompt_inputs as prompt_inputs
from .quantize import (
    Quantized as Quantized,
    dequantize as dequantize,
    is_quantized as is_quantized,
    quantize as quantize,
    quantize_array as quantize_array,
)
from .sharding import shardings as shardings
from .training import (
    adapter_optimizer as adapter_optimizer,
    combine as combine,
    count_parameters as count_parameters,
    partition as partition,
    print_trainable_parameters as print_trainable_parameters,
    summary as summary,
    trainable_mask as trainable_mask,
)
from .transforms import (
    active as active,
    adapter_names as adapter_names,
    constrain as constrain,
    delete as delete,
    frozen_adapters as frozen_adapters,
    inject as inject,
    merge as merge,
    merge_and_unload as merge_and_unload,
    set_active as set_active,
    set_trainable as set_trainable,
    targeted_modules as targeted_modules,
    unload as unload,
    unmerge as unmerge,
)
from .tuner_api import (
    adapters_disabled as adapters_disabled,
    disable_adapters as disable_adapters,
    enable_adapters as enable_adapters,
    get_delta_weight as get_delta_weight,
    scale_layer as scale_layer,
    set_requires_grad as set_requires_grad,
    set_scale as set_scale,
    unscale_layer as unscale_layer,
)

__version__ = "0.1.0"

# Every registered method's config class, by its PEFT name (`pj.LoraConfig`, ...), and its
# own public functions (`Method.api`): the registry row is the one place a method is listed.
_CONFIGS: dict[str, object] = {m.config.__name__: m.config for m in METHODS.values()}
_CONFIGS.update({n: f for m in METHODS.values() for n, f in m.api.items()})
globals().update(_CONFIGS)

__all__ = sorted(
    [
        "Adapted",
        "add_weighted_adapter",
        "hotswap",
        "prepare_hotswap",
        "AdaptedArrayError",
        "AdapterCheckpointer",
        "AdapterNameTypeError",
        "ArgumentTypeError",
        "LayoutError",
        "PartitionError",
        "frozen_adapters",
        "set_trainable",
        "CheckpointNotFoundError",
        "AdapterNameError",
        "ConfigError",
        "FormatError",
        "Layout",
        "MergeError",
        "PeftJaxError",
        "ShapeError",
        "ShardingError",
        "shardings",
        "prompt_inputs",
        "Quantized",
        "dequantize",
        "is_quantized",
        "quantize",
        "quantize_array",
        "TargetError",
        "UnsupportedModuleError",
        "active",
        "stacked_key_map",
        "convert_to_lora",
        "inject_from_state_dict",
        "save_as_lora",
        "supports_lora_conversion",
        "save_pretrained",
        "read_adapter",
        "load_pretrained",
        "inspect_adapter",
        "apply",
        "adapter_names",
        "adapter_optimizer",
        "combine",
        "config_from_dict",
        "count_parameters",
        "delete",
        "factorization",
        "inject",
        "merge",
        "merge_and_unload",
        "partition",
        "print_trainable_parameters",
        "set_active",
        "summary",
        "targeted_modules",
        "trainable_mask",
        "unload",
        "unmerge",
        "METHODS",
        "constrain",
        "adapters_disabled",
        "disable_adapters",
        "enable_adapters",
        "get_delta_weight",
        "scale_layer",
        "set_requires_grad",
        "set_scale",
        "unscale_layer",
        *_CONFIGS,
    ]
)
