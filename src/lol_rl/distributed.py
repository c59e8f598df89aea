"""Several processes per run (`accelerate launch`, or torchrun): who this process is, and the few
collectives the stages need. accelerate's PartialState owns the process group (NCCL on GPUs,
gloo on CPU); with one process every function here is the identity.

    accelerate launch --multi_gpu --num_processes 4 -m lol_rl.cli train   # 4 GPUs, or 4 CPU processes (gloo)

The training stages (sft, offline rl) are data-parallel: every process draws the same global
batch and trains on its own disjoint share of it under torch DDP, so the averaged gradient is
the full batch's. The main process alone validates, writes artifacts, checkpoints and metrics.
The one-pass stages (value sampling and scoring, the reference log-probs and rewards, V(x) of
the advantage stage, eval's generation and scoring) are sharded by batch (`map_batches`):
process r runs batches r, r+N, ... and every process gets all results back in batch order,
so the artifact the main process writes is the one a single process writes. Online PPO's rl
stage is built by the main process while the others wait (see cache.py).

    accelerate launch --config_file conf/accelerate/fsdp.yaml -m lol_rl.cli train   # FSDP2, full fine-tuning

Under an FSDP launch config (`distributed_type: FSDP`, `fsdp_version: 2`) the same two loops
shard the model instead of replicating it (accelerate's FSDP plugin applies torch's
`fully_shard`): each process holds 1/N of the weights, gradients and optimizer state. Every
process then joins what needs the whole weights (validation's generation, saving the policy),
checkpoints are sharded (torch DCP, one file per process) and the artifacts are the full
weights, written by the main process, so the later stages read them as they read any.

With `LOL_RL_SHARD_RECORD=<dir>` (tests only) every process appends, per training step, the
rows it trained on to `<dir>/<stage>-rank<r>.jsonl`, and per sharded pass the batches it ran to
`<dir>/map-rank<r>.jsonl`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import ConfigError, LolRlError

# the other processes wait in a collective while the main one builds a whole stage (PPO's rl
# stage), or fits the value head, or validates: torch's 30-minute default would kill them
PROCESS_GROUP_TIMEOUT = timedelta(hours=48)


def _state():
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # no GPU visible (or `accelerate launch --cpu`): the processes are CPU ones, over gloo
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)


def shutdown() -> None:
    """Destroy the process group before the interpreter exits: left to its teardown, gloo's
    threads can abort a process that finished its work ('terminate called without an active
    exception', exit status -6), which fails the whole launch."""
    if launched() and torch.distributed.is_initialized():
        _state().destroy_process_group()


def launched() -> bool:
    """Started by a multi-process launcher (accelerate launch, torchrun): it sets WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return _state().num_processes if launched() else 1


def rank() -> int:
    return _state().process_index if launched() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if launched():
        _state().wait_for_everyone()


def broadcast(value=None):
    """The main process's `value`, on every process (pickled; for small Python objects)."""
    if world_size() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def mean_over_processes(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each 0-d tensor averaged over the processes, in one all-reduce."""
    if world_size() == 1 or not values:
        return values
    from accelerate.utils import reduce

    means = reduce(torch.stack([v.float() for v in values.values()]), reduction="mean")
    return dict(zip(values, means))


def process_mean(value: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor averaged over the processes (itself with one): a loss's statistic of the
    global batch when each process holds an equal share of it."""
    return mean_over_processes({"value": value})["value"] if world_size() > 1 else value


def process_device(device: torch.device) -> torch.device:
    """This process's device: its own GPU under several processes (`cuda` alone means cuda:0)."""
    if device.type == "cuda" and world_size() > 1:
        return _state().device
    return device


def shard_rows(rows: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Process `rank`'s part of a global batch: every `world`-th row from position `rank`. The
    parts are disjoint, equal-sized and cover the batch, so the mean of their mean losses is the
    batch's mean loss; on a length-sorted batch each part gets long and short rows alike."""
    if len(rows) % world:
        raise ValueError(f"a batch of {len(rows)} rows cannot be split evenly over {world} processes; "
                         f"use a batch size divisible by {world}")
    return rows[rank::world]


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The model wrapped in torch DDP under several processes (its backward averages the
    gradients over them), the model itself with one."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def fully_sharded() -> bool:
    """Launched with an FSDP accelerate config: the training loops shard their model (`shard`)."""
    from accelerate.utils import parse_flag_from_env

    return launched() and parse_flag_from_env("ACCELERATE_USE_FSDP")


def check_fsdp_version(version: int) -> None:
    if version != 2:
        raise ConfigError(f"the accelerate config asks for FSDP version {version}; lol-rl shards with FSDP2: set "
                          f"fsdp_version: 2 under fsdp_config (as conf/accelerate/fsdp.yaml does)")


def shard(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """`model` sharded in place by FSDP2 as the launch config says (accelerate's FSDP plugin reads
    the FSDP_* variables `accelerate launch` sets: wrap policy, reshard after forward, offload),
    and `optimizer` moved onto the sharded parameters. The plain optimizer comes back, not
    accelerate's wrapper: the loop clips and steps it itself, as under DDP."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    check_fsdp_version(plugin.fsdp_version)
    accelerator = Accelerator(cpu=_state().device.type == "cpu", fsdp_plugin=plugin)
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate (1.16) turns FSDP on for accelerator devices only, while torch's fully_shard runs on
        # CPU processes over gloo too: set the two fields its device branch sets (the CPU tests use this)
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    model, prepared = accelerator.prepare(model, optimizer)
    return model, prepared.optimizer


def load_device(device: torch.device) -> torch.device:
    """Where a training stage loads its model: the CPU under FSDP (fully_shard moves each
    process's shard to its own device, so no device ever holds the whole model), else `device`."""
    return torch.device("cpu") if fully_sharded() else device


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's whole weights, gathered on the main process's CPU (every process must
    call it; the others get None). None for a model that is not sharded: it holds its weights."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    # the gather copies tied weights (GPT-2's lm_head is wte) apart: alias them again, so that
    # save_pretrained drops the tied copy as it does for a model that was never sharded
    first = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(parameter), name)
        weights[name] = weights[first[id(parameter)]]
    return weights


def record_shard(stage: str, step: int, rows: torch.Tensor) -> None:
    """With LOL_RL_SHARD_RECORD set: the train rows this process took at `step`."""
    folder = os.environ.get("LOL_RL_SHARD_RECORD")
    if not folder:
        return
    record = {"step": step, "rank": rank(), "world": world_size(), "rows": rows.tolist()}
    with (Path(folder) / f"{stage}-rank{rank()}.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def map_batches(fn: Callable[[Any], Any], batches: Sequence, desc: str, sharded: bool = False,
                seeds_each_batch: bool = False) -> list:
    """`[fn(batch) for batch in batches]`. `sharded` (every process calls this, with the same
    batches): process r computes batches r, r+N, ... and the results are all-gathered, in
    batch order, on every process; each batch is computed as a single process computes it, so
    the list is the single process's. With one process, or not `sharded` (a pass the main
    process runs alone, as validation), it is that plain loop.

    `seeds_each_batch`: `fn` seeds the global RNG itself before drawing from it (generation),
    so a single process ends with the RNG state its last batch left; under N processes that
    state is sent from the process that ran the last batch to all the others."""
    from .progress import progress_disabled  # it imports this module

    world = world_size() if sharded else 1
    mine = range(rank(), len(batches), world) if world > 1 else range(len(batches))
    record_map(desc, list(mine), len(batches), world)
    if world == 1:
        return [fn(batches[i]) for i in tqdm(mine, desc=desc, disable=progress_disabled(), leave=False)]
    error, failure = None, ""
    try:
        results = [fn(batches[i]) for i in tqdm(mine, desc=desc, disable=progress_disabled(), leave=False)]
    except Exception as err:  # the others must hear of it, not wait for this share until the timeout
        error, failure, results = err, f"{type(err).__name__}: {err}", []
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, (failure, results))
    failed = [(r, text) for r, (text, _) in enumerate(gathered) if text]
    if error is not None:
        raise error
    if failed:
        raise ShardError(f"{desc}: process {failed[0][0]} of {world} failed: {failed[0][1]}")
    if seeds_each_batch and batches:
        state = [_rng_state()]
        torch.distributed.broadcast_object_list(state, src=(len(batches) - 1) % world)
        _set_rng_state(state[0])
    # process r's j-th result is batch r + j * world
    return [gathered[i % world][1][i // world] for i in range(len(batches))]


class ShardError(LolRlError, RuntimeError):
    """Another process failed in its share of a sharded pass; names the pass and the process."""


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device's
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def record_map(desc: str, batches: list[int], total: int, world: int) -> None:
    """With LOL_RL_SHARD_RECORD set: the batches of a `map_batches` pass this process ran."""
    folder = os.environ.get("LOL_RL_SHARD_RECORD")
    if not folder:
        return
    record = {"desc": desc, "rank": rank(), "world": world, "batches": batches, "of": total}
    with (Path(folder) / f"map-rank{rank()}.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
