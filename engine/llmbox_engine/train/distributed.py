"""Who this process is among a training's processes, and the few collectives the training loop needs.

One process (the default, and what `llmbox train` runs on one device): rank 0 of 1, every collective returns
its input and costs nothing. Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment) the context
joins the process group (NCCL on GPUs, gloo on CPU) and the same calls reduce across processes. Reductions run
in float64 on CPU tensors through gloo-safe dtypes: bf16 collectives fail on gloo.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The one process that prints, logs, saves and publishes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls) -> DistributedContext:
        """Join torchrun's process group when launched by it; a single process otherwise."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        import torch
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # one GPU per process: "cuda" means this one from here on
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over every process."""
        if not self.distributed:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [float(v) for v in tensor.cpu()]

    def max(self, value: int) -> int:
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop asked of any rank stops them all, together)."""
        return bool(self.max(int(flag)))

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value` (picklable), in rank order, on every process."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def check_same_data(self, digest: str, count: int) -> None:
        """Every process must train on the same examples (each takes its share of one global list): stop at
        once, naming the node whose data differs, rather than train on mismatched shards."""
        if not self.distributed:
            return
        node = int(os.environ.get("GROUP_RANK", "0"))  # torchrun's node rank
        seen = self.gather((digest, count, node))
        reference, ref_count, _ = seen[0]
        differ = sorted({n for d, _, n in seen if d != reference})
        if differ:
            counts = ", ".join(sorted({f"node {n}: {c} examples" for _, c, n in seen}))
            nodes = ", ".join(str(n) for n in differ)
            from llmbox.errors import UserError

            raise UserError(f"the training data on node {nodes} differs from node 0's ({counts}; node 0: "
                            f"{ref_count}): give every node the same --data (same files, same contents)")  # fmt: skip

    def share(self, items: Sequence[Any]) -> list[Any]:
        """This process's share of a list every process built alike: every world_size-th item from its rank."""
        return list(items[self.rank :: self.world_size])

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _device(self) -> Any:
        import torch

        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
