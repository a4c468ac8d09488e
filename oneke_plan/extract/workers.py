"""oneke-run as one of several workers under torchrun: which replica, which prompts, when to merge.

torchrun starts `--nproc-per-node` workers on each of `--nnodes` nodes and sets, for each, RANK (its place among
all workers), WORLD_SIZE, LOCAL_RANK (its place on its node) and LOCAL_WORLD_SIZE. A profile of R replicas on N
nodes (format 2) needs R workers on each node: worker LOCAL_RANK runs replica LOCAL_RANK, whose device_map names
GPUs by their index on that node (CUDA_VISIBLE_DEVICES unset, or the same on every node, with
CUDA_DEVICE_ORDER=PCI_BUS_ID so indexes are the physical order). Worker RANK answers the prompts whose key hashes
to RANK (the same prompt, the same worker, for a given number of workers: --resume continues each part), journals
them in its own part file, and when every worker is through (a barrier over torch.distributed's gloo backend: no
GPU communication), worker 0 writes the output from all parts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from oneke_plan.core.errors import BadInput

# Workers finish their parts at different times; the first may wait for the last for as long as a part can take.
BARRIER_TIMEOUT = timedelta(days=30)


@dataclass(frozen=True)
class Worker:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restarts: int = 0  # how often torchrun restarted the workers (TORCHELASTIC_RESTART_COUNT)

    @staticmethod
    def from_env(environ: dict[str, str] | None = None) -> Worker:
        """This process's place, from the variables torchrun sets; a single worker without them."""
        env = dict(os.environ if environ is None else environ)
        if "WORLD_SIZE" not in env:
            return Worker()
        try:
            return Worker(
                rank=int(env["RANK"]),
                world_size=int(env["WORLD_SIZE"]),
                local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                restarts=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
            )
        except (KeyError, ValueError) as exc:
            raise BadInput(
                f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK variables are incomplete or not numbers ({exc})"
            ) from None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def check(self, replicas: int, nodes: int) -> None:
        """The workers torchrun started must be the profile's replicas on its nodes; anything else is one line (exit
        2) in every worker before any of them waits for another."""
        wanted = replicas * nodes
        command = f"torchrun --nproc-per-node {replicas}" + (
            f" --nnodes {nodes} --rdzv-endpoint HOST:PORT" if nodes > 1 else ""
        )
        if self.world_size != wanted or self.local_world_size != replicas:
            if not self.distributed:
                raise BadInput(
                    f"the profile has {replicas} replicas"
                    + (f" on each of {nodes} nodes" if nodes > 1 else "")
                    + f": run oneke-run under {command} -m oneke_plan.cli.run ..., one worker per replica"
                )
            raise BadInput(
                f"the profile has {replicas} replicas per node on {nodes} node(s), {wanted} workers in all; torchrun "
                f"started {self.world_size} ({self.local_world_size} on this node): run {command} "
                "-m oneke_plan.cli.run ..."
            )

    def mine(self, key: str) -> bool:
        """Whether this worker answers the prompt `key`: a stable hash of the key, modulo the number of workers."""
        if not self.distributed:
            return True
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") % self.world_size == self.rank


class Group:
    """torch.distributed's process group for the workers (gloo: CPU only, nothing of the GPUs), set up on entry."""

    def __init__(self, worker: Worker):
        self.worker = worker

    def __enter__(self) -> Group:
        if self.worker.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.worker.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                if exc[0] is None:
                    dist.barrier()  # leave together: gloo aborts a process whose peer tore the group down first
                dist.destroy_process_group()

    def barrier(self) -> None:
        if self.worker.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every worker's `value`, in rank order (worker 0 prints the totals)."""
        if not self.worker.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.worker.world_size
        dist.all_gather_object(values, value)
        return values
