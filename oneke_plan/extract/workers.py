"""oneke-run as one of several workers under torchrun: which replica, which prompts, when to merge.

torchrun starts `--nproc-per-node` workers on each of `--nnodes` nodes and sets, for each, RANK (its place among
all workers), WORLD_SIZE, LOCAL_RANK (its place on its node) and LOCAL_WORLD_SIZE. A profile of R replicas on N
nodes (format 2) needs R workers on each node: worker LOCAL_RANK runs replica LOCAL_RANK, whose device_map names
GPUs by their index on that node (CUDA_VISIBLE_DEVICES unset, or the same on every node, with
CUDA_DEVICE_ORDER=PCI_BUS_ID so indexes are the physical order). Worker RANK answers the prompts whose key hashes
to RANK (the same prompt, the same worker, for a given number of workers: --resume continues each part), journals
them in its own part file, and when every worker is through (a barrier over torch.distributed's gloo backend: no
GPU communication), worker 0 writes the output from all parts.

torchrun's variables are checked where they are read (Worker.from_env), before any worker waits for another; the
workers then meet at a rendezvous (join) bounded by oneke-run's --join-timeout, which names the workers that did
not come instead of waiting for them for ever.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from oneke_plan.core.errors import BadInput
from oneke_plan.core.sizes import NumberError, parse_int

# Workers finish their parts at different times; the first may wait for the last for as long as a part can take.
BARRIER_TIMEOUT = timedelta(days=30)
MAX_WORKERS = 1_000_000
_HOST = re.compile(r"[A-Za-z0-9._:%\[\]-]{1,255}")  # a host name, an IPv4 or IPv6 address


@dataclass(frozen=True)
class Worker:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restarts: int = 0  # how often torchrun restarted the workers (TORCHELASTIC_RESTART_COUNT)
    master_addr: str = ""  # where worker 0's rendezvous is (MASTER_ADDR, MASTER_PORT), with several workers
    master_port: int = 0
    agent_store: bool = False  # torchrun's agent hosts the rendezvous, not worker 0 (TORCHELASTIC_USE_AGENT_STORE)

    @staticmethod
    def from_env(environ: Mapping[str, str] | None = None, replicas: int | None = None, nodes: int = 1) -> Worker:
        """This process's place, from the variables torchrun sets, each checked; a single worker without
        WORLD_SIZE. The one place they are read: each must be ASCII digits in its range (0 <= RANK < WORLD_SIZE,
        0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE), and several workers need MASTER_ADDR and MASTER_PORT
        (1..65535) for their rendezvous; anything else is one BadInput line naming the variable, its value, the
        rule and what to do, before any worker waits for another. With the profile's `replicas` per node on
        `nodes` nodes, the workers must also be those (check)."""
        env = os.environ if environ is None else environ
        fix = _start_hint(replicas, nodes)
        if "WORLD_SIZE" not in env:
            worker = Worker()
        else:
            world = _number(env, "WORLD_SIZE", 1, MAX_WORKERS, "the number of workers in all", fix)
            rank = _number(env, "RANK", 0, world - 1, f"this worker's place among the WORLD_SIZE={world}", fix)
            local_world = _number(
                env, "LOCAL_WORLD_SIZE", 1, world, "the number of workers on this node", fix, default=str(world)
            )
            local_rank = _number(
                env,
                "LOCAL_RANK",
                0,
                local_world - 1,
                f"this worker's place among the LOCAL_WORLD_SIZE={local_world} on its node",
                fix,
                default=env.get("RANK"),
            )
            restarts = _number(
                env, "TORCHELASTIC_RESTART_COUNT", 0, MAX_WORKERS, "how often torchrun restarted", fix, default="0"
            )
            addr, port = "", 0
            if world > 1:
                addr = env.get("MASTER_ADDR", "")
                if not _HOST.fullmatch(addr):
                    raise _bad("MASTER_ADDR", env.get("MASTER_ADDR"), "where worker 0's rendezvous is", "a host "
                               f"name or IP address when WORLD_SIZE={world}", fix)  # fmt: skip
                port = _number(env, "MASTER_PORT", 1, 65535, "the port of worker 0's rendezvous", fix)
            agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            worker = Worker(rank, world, local_rank, local_world, restarts, addr, port, agent)
        if replicas is not None:
            worker.check(replicas, nodes)
        return worker

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def check(self, replicas: int, nodes: int) -> None:
        """The workers torchrun started must be the profile's replicas on its nodes; anything else is one line (exit
        2) in every worker before any of them waits for another."""
        wanted = replicas * nodes
        command = _torchrun_command(replicas, nodes)
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


def _start_hint(replicas: int | None, nodes: int) -> str:
    """What to do about a wrong variable: start oneke-run the way that sets them all."""
    if replicas is None:
        return (
            "start oneke-run under torchrun --nproc-per-node N -m oneke_plan.cli.run ... (N: the profile's replicas "
            "per node), which sets it, or unset WORLD_SIZE to run one process"
        )
    alone = ", or unset WORLD_SIZE to run one process" if replicas * nodes == 1 else ""
    return f"start oneke-run under {_torchrun_command(replicas, nodes)} -m oneke_plan.cli.run ..., which sets it{alone}"


def _torchrun_command(replicas: int, nodes: int) -> str:
    return f"torchrun --nproc-per-node {replicas}" + (
        f" --nnodes {nodes} --rdzv-endpoint HOST:PORT" if nodes > 1 else ""
    )


def _shown(value: str) -> str:
    """A variable's value for a message: quoted with escapes (one line whatever it holds), cut when long."""
    return repr(value) if len(value) <= 40 else repr(value[:40]) + f"... ({len(value)} characters)"


def _bad(name: str, value: str | None, meaning: str, rule: str, fix: str) -> BadInput:
    shown = "not set" if value is None else _shown(value)
    return BadInput(f"torchrun's {name} is {shown}; it is {meaning}, and must be {rule}: {fix}")


def _number(
    env: Mapping[str, str], name: str, low: int, high: int, meaning: str, fix: str, default: str | None = None
) -> int:
    """The variable `name` (else `default`) as a whole number from `low` to `high`, written in ASCII digits."""
    value = env.get(name, default)
    number: int | None = None
    if value is not None and value == value.strip(" \t"):  # torchrun writes bare digits: spaces mean a hand-set value
        try:
            number = parse_int(value, name)
        except NumberError:
            pass
    if number is None or not low <= number <= high:
        rule = f"{low}" if low == high else f"{low} to {high}"
        raise _bad(name, env.get(name), meaning, f"a whole number (ASCII digits) from {rule}", fix)
    return number


def join_timeout(seconds: int) -> timedelta:
    """oneke-run's --join-timeout, checked: at least a second, at most the barrier's own limit."""
    longest = int(BARRIER_TIMEOUT.total_seconds())
    if not 1 <= seconds <= longest:
        raise BadInput(f"--join-timeout must be 1 to {longest} seconds, not {seconds}")
    return timedelta(seconds=seconds)


class Group:
    """torch.distributed's process group for the workers (gloo: CPU only, nothing of the GPUs), set up on entry
    once every worker has joined (join: at most `join_timeout`)."""

    def __init__(self, worker: Worker, join_timeout: timedelta):
        self.worker = worker
        self.join_timeout = join_timeout

    def __enter__(self) -> Group:
        if self.worker.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                store = join(self.worker, self.join_timeout)
                dist.init_process_group(
                    backend="gloo",
                    store=store,
                    rank=self.worker.rank,
                    world_size=self.worker.world_size,
                    timeout=BARRIER_TIMEOUT,
                )
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


# -- the rendezvous --------------------------------------------------------------------------------------------------
_POLL_S = 0.05  # how often a waiting worker looks (and, between looks, a SIGTERM or Ctrl-C can stop it)


def join(worker: Worker, timeout: timedelta) -> Any:
    """The workers' rendezvous, bounded: every worker connects to the store at MASTER_ADDR:MASTER_PORT (torchrun's
    agent hosts it; without torchrun's agent, worker 0 does), says it is there under its RANK, and waits until all
    WORLD_SIZE have, for at most `timeout`. Then the store, for the process group; else one BadInput line naming the
    workers that did not come. Waits in short steps, so a stop signal ends it at once."""
    deadline = time.monotonic() + timeout.total_seconds()
    seconds = round(timeout.total_seconds())
    with _cpp_warnings_silenced():
        return _join(worker, timeout, deadline, seconds)


@contextlib.contextmanager
def _cpp_warnings_silenced() -> Iterator[None]:
    """Standard error closed to torch's C++ code while it runs: a store call that finds the store gone logs a
    warning with a C++ stack on file descriptor 2 before it raises, and the raise becomes our one line. Python's
    own messages are printed once this is left (they are raised, not printed, in here)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _join(worker: Worker, timeout: timedelta, deadline: float, seconds: int) -> Any:
    store = _connect(worker, timeout, deadline, seconds)
    store.set_timeout(timeout)  # each call on it, and the process group's own connection: bounded as well
    prefix = f"oneke-plan/join/{worker.restarts}/"
    joined = 0
    try:
        if store.add(f"{prefix}rank/{worker.rank}", 1) != 1:
            raise BadInput(
                f"another worker has this worker's RANK={worker.rank} (of WORLD_SIZE={worker.world_size}) at the "
                f"rendezvous {worker.master_addr}:{worker.master_port}: each worker needs its own RANK; start "
                "them with torchrun, which numbers them"
            )
        joined = store.add(f"{prefix}count", 1)
        while joined < worker.world_size:
            if time.monotonic() >= deadline:
                missing = [r for r in range(worker.world_size) if not store.check([f"{prefix}rank/{r}"])]
                raise BadInput(_missing(missing, worker, seconds))
            time.sleep(_POLL_S)
            joined = store.add(f"{prefix}count", 0)
    except RuntimeError:  # the store went away: its host stopped waiting, or was stopped
        holder = "torchrun's agent" if worker.agent_store else "worker 0"
        raise BadInput(
            f"the rendezvous at {worker.master_addr}:{worker.master_port} closed after {joined} of "
            f"{worker.world_size} workers had joined ({holder}, which holds it, stopped waiting for the others): "
            "start every worker (torchrun --nproc-per-node starts a node's workers together; each node needs its "
            "own torchrun), or give the workers longer with --join-timeout"
        ) from None
    return store


def _connect(worker: Worker, timeout: timedelta, deadline: float, seconds: int) -> Any:
    """The rendezvous store: opened by worker 0 (without torchrun's agent), else connected to, retried in short
    steps until `deadline`."""
    from torch.distributed import TCPStore

    where = f"{worker.master_addr}:{worker.master_port}"
    if worker.rank == 0 and not worker.agent_store:
        try:
            return TCPStore(
                worker.master_addr,
                worker.master_port,
                worker.world_size,
                is_master=True,
                timeout=timeout,
                wait_for_workers=False,
            )
        except RuntimeError as exc:
            raise BadInput(
                f"worker 0 cannot open the rendezvous at MASTER_ADDR:MASTER_PORT {where} ({_reason(exc)}): choose a "
                "free port on this host (torchrun --master-port)"
            ) from None
    while not _reachable(worker.master_addr, worker.master_port, deadline):
        if time.monotonic() >= deadline:
            host = "torchrun's agent" if worker.agent_store else f"worker 0 of {worker.world_size}"
            raise BadInput(
                f"{host} did not open the rendezvous at MASTER_ADDR:MASTER_PORT {where} within {seconds} s: start "
                "it (or check MASTER_ADDR and MASTER_PORT), or give the workers longer with --join-timeout"
            )
        time.sleep(_POLL_S)
    try:
        return TCPStore(
            worker.master_addr, worker.master_port, worker.world_size, is_master=False, timeout=timeout,
            wait_for_workers=False,
        )  # fmt: skip
    except RuntimeError as exc:
        raise BadInput(
            f"the rendezvous at MASTER_ADDR:MASTER_PORT {where} answers, but not as torch's store ({_reason(exc)}): "
            "check MASTER_ADDR and MASTER_PORT"
        ) from None


def _reason(exc: RuntimeError) -> str:
    """The first line of torch's store error (the rest is a C++ stack), for a one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _reachable(host: str, port: int, deadline: float) -> bool:
    """Whether something listens at host:port, asked with a plain connection (torch's own client would log each
    refused try on stderr, with a C++ stack)."""
    wait = max(0.05, min(1.0, deadline - time.monotonic()))
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=wait):
            return True
    except OSError:
        return False


def _missing(missing: list[int], worker: Worker, seconds: int) -> str:
    """The line for workers that did not join: which ones, and what to do."""
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    names = ", ".join(str(rank) for rank in missing[:10]) + more
    who, them = (f"worker {names}", "it") if len(missing) == 1 else (f"workers {names}", "them")
    return (
        f"{who} of {worker.world_size} did not join the rendezvous at {worker.master_addr}:{worker.master_port} "
        f"within {seconds} s: start {them} (torchrun --nproc-per-node starts a node's workers together; each node "
        "needs its own torchrun), or give the workers longer with --join-timeout"
    )
