"""Where a run executes: the device, its autocast dtype, and this process's place in a torchrun
(DDP) job, with the few collectives the trainer needs."""

from __future__ import annotations

import dataclasses
import os

import torch

from .errors import TrainError


@dataclasses.dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control_group: object = None  # gloo group for host-side agreement (no GPU sync under nccl)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when flag is True on any: one tiny CPU collective under DDP."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0])
        torch.distributed.all_reduce(value, group=self.control_group)
        return bool(value.item())

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.enabled:
            return [obj]
        objects = [None] * self.world_size
        torch.distributed.all_gather_object(objects, obj, group=self.control_group)
        return objects

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier(group=self.control_group)


def pick_device(setting: str, local_rank: int) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device {setting!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_setting: str) -> tuple[Distributed, torch.device]:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK and joins the process group (nccl on CUDA,
    gloo on CPU); a plain process gets rank 0 of 1 and no group."""
    env = os.environ
    dist = Distributed(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")),
                       int(env.get("LOCAL_RANK", "0")))
    device = pick_device(device_setting, dist.local_rank)
    if dist.enabled and device.type == "cuda":
        torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl", device_id=device)
        dist.control_group = torch.distributed.new_group(backend="gloo")
    elif dist.enabled:
        torch.distributed.init_process_group(backend="gloo")
        dist.control_group = torch.distributed.group.WORLD
    return dist, device


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, setting)

