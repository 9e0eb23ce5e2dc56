"""FSDP2 for a model too big for one device: `fully_shard` on every decoder layer, then on the backbone.

The loss (`loss.py`) runs the backbone and the output head separately, and reads the head's weight itself; so
the backbone is the root unit, and the token embedding and output head stay whole on every process (they
are frozen, and often one tensor when tied). Everything else, the LoRA weights with it, is split across the
processes and gathered one layer at a time. Saving gathers the full adapter and optimizer state (every
process takes part; the main one writes); they are keyed by parameter names, so a resumed run can load them
into its own shards.
"""

from __future__ import annotations

from typing import Any


def shard(model: Any, world_size: int, device_type: str) -> Any:
    """Shard `model` (a peft model) in place across the process group; the root FSDP module (the backbone)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    base = model.get_base_model()
    backbone = base.model
    for layer in decoder_layers(backbone):
        fully_shard(layer, mesh=mesh)
    whole = {backbone.get_input_embeddings().weight, base.get_output_embeddings().weight}
    return fully_shard(backbone, mesh=mesh, ignored_params=whole)


def decoder_layers(backbone: Any) -> list[Any]:
    """One FSDP unit each: the modules transformers itself keeps whole (`_no_split_modules`)."""
    names = set(getattr(backbone, "_no_split_modules", None) or [])
    layers = [m for m in backbone.modules() if type(m).__name__ in names]
    if not layers and hasattr(backbone, "layers"):
        layers = list(backbone.layers)
    return layers


def full_states(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole model and optimizer state on CPU, named by parameter; every process must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """A full, name-keyed optimizer state (from `full_states`) into this process's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def full_value(tensor: Any) -> Any:
    """A sharded (DTensor) result, such as the gradient norm, as a plain tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
