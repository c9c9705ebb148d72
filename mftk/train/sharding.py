"""The fsdp2 model: fp32 adapter masters, activation checkpointing, FSDP2 sharding, and the whole
adapters gathered back for writing them.

- Sharding: `fully_shard` on every decoder layer (the model's `_no_split_modules` classes), then
  the root. The frozen base is sharded on dim 0 in its model dtype; the adapters are cast to fp32
  masters first and sharded on a feature dim (lora_a (T, R, D_in) on D_in, lora_b (T, D_out, R) on
  D_out, router (T, D_in) on D_in): dim 0 is T, and 4 tasks on 8 GPUs would leave half the ranks
  empty. `MixedPrecisionPolicy(param_dtype, reduce_dtype)` casts *every* parameter to param_dtype
  in the all-gather, so the mftk op sees x, weight, lora_a, lora_b in one dtype (as it requires);
  gradients are reduce-scattered in reduce_dtype into the fp32 masters.
- Activation checkpointing per decoder layer through transformers' own
  `activation_checkpointing_enable` (non-reentrant torch.utils.checkpoint), which keeps the module
  names (and so the adapter checkpoint keys) unchanged. Backward runs inside `mftk.use_tasks`
  (mftk.train.step.forward_batch): the recomputed forward reads the routing again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from mftk.core import adapter_layers
from mftk.core import decoder_layers as find_decoder_layers
from mftk.patch import adapter_parameters
from mftk.train.config import Config, ConfigError
from mftk.train.tiny_model import DTYPES

ADAPTER_PARAMS = ("lora_a", "lora_b", "router_weight", "router_bias", "shared_a", "shared_b")
# the feature dim each adapter tensor is sharded on (dim 0 is the task dim T; the hybrid shared
# adapter (R_s, D_in) / (D_out, R_s) has no T: its feature dims too)
SHARD_DIMS = {
    "lora_a": 2, "lora_b": 1, "router_weight": 1, "router_bias": 0, "shared_a": 1, "shared_b": 0,
}  # fmt: skip


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (mftk.core.decoder_layers); fsdp2 shards one at a time."""
    layers = [m for _, m in find_decoder_layers(model)]
    if not layers:
        names = sorted(getattr(model, "_no_split_modules", None) or [])
        raise ConfigError(
            f"distributed.strategy: found no decoder layers in {type(model).__name__} "
            f"(_no_split_modules={names}); fsdp2 shards one decoder layer at a time"
        )
    return layers


def shard_model(
    model: nn.Module,
    device: torch.device,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
) -> int:
    """fully_shard every decoder layer, then the root, on a 1-D mesh over all ranks (in place);
    returns the number of decoder layers.

    The adapter tensors are sharded on their feature dim (SHARD_DIMS), everything else on dim 0.
    A model on the CPU with a CUDA mesh moves only each rank's shard to its GPU.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    dims = {}
    for _, m in adapter_layers(model):
        for k in ADAPTER_PARAMS:
            p = getattr(m, k)
            if p is not None:
                dims[id(p)] = SHARD_DIMS[k]

    def place(p: nn.Parameter):
        return Shard(dims[id(p)]) if id(p) in dims else None

    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, shard_placement_fn=place)
    fully_shard(model, mesh=mesh, mp_policy=mp, shard_placement_fn=place)
    return len(layers)


def prepare_model(
    model: nn.Module, cfg: Config, device: torch.device, log: Callable[[str], None]
) -> None:
    """fp32 adapter masters, activation checkpointing (distributed.activation_checkpointing),
    then shard_model with distributed.mixed_precision's dtypes; logs what it did."""
    di = cfg.distributed
    with torch.no_grad():  # patch_model creates the adapters in the base dtype
        for p in adapter_parameters(model):
            p.data = p.data.float()
    if di.activation_checkpointing:
        if getattr(model.config, "use_cache", None):  # training needs no KV cache
            model.config.use_cache = False
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    mp = di.mixed_precision
    param_dtype = DTYPES[mp.param_dtype or cfg.model.dtype]
    n_layers = shard_model(model, device, param_dtype, DTYPES[mp.reduce_dtype])
    ac = "on" if getattr(model, "is_activation_checkpointing", False) else "off"
    log(
        f"fsdp2: {dist.get_world_size()} ranks ({dist.get_backend()}, {device.type}), "
        f"{n_layers} decoder layers + root sharded, params in {param_dtype}, grads reduced in "
        f"{mp.reduce_dtype}, adapters fp32, activation checkpointing {ac}, attention "
        f"{model.config._attn_implementation}"
    )


@contextlib.contextmanager
def full_adapters(model: nn.Module, full: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily put full (unsharded) adapter tensors, {fqn: tensor} from a full state dict,
    into the adapter layers, for mftk.save_adapters / export_peft; restores the shards on exit."""
    saved = []
    for name, m in adapter_layers(model):
        for k in ADAPTER_PARAMS:
            key = f"{name}.{k}" if name else k
            if key in full:
                saved.append((m, k, m._parameters[k]))
                m._parameters[k] = nn.Parameter(full[key], requires_grad=False)
    try:
        yield
    finally:
        for m, k, p in saved:
            m._parameters[k] = p


@contextlib.contextmanager
def gathered_adapters(model: nn.Module, rank: int) -> Iterator[None]:
    """Collective: gather the whole adapters (fp32, on the CPU) on rank 0, which holds them in
    the model inside the block (full_adapters); the other ranks wait for it at the end."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    full = get_model_state_dict(model, options=opts)
    with full_adapters(model, full) if rank == 0 else contextlib.nullcontext():
        yield
    dist.barrier()
