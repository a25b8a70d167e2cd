"""Collectives that work under NCCL, crash traces on every rank, and host->device copies.

- every collective under launcher/ goes through launcher/distributed.py (an `ast` check of the tree);
- the device each backend's collectives take (gloo -> cpu, nccl -> cuda:LOCAL_RANK);
- the helpers' results on 2 real gloo ranks (dtype and tensor kept);
- faulthandler on at the trainer's and embed's entries, and a real segfault printing thread stacks;
- non_blocking copies only from pinned memory to CUDA.
"""
from __future__ import annotations

import ast
import faulthandler
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from notellm2.launcher import distributed as D
from notellm2.data_shards.batch import copy_can_be_async
from notellm2.data_shards.batch import to_device as move_batch
from tests.helpers.multirank import base_env, run_ranks
from tests.helpers.paths import REPO

# torch.distributed (and deepspeed.comm) functions that talk to other ranks, plus the group start/stop
# that belongs to launcher/distributed.py too.
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_object", "all_gather_into_tensor",
    "all_gather_coalesced", "_all_gather_base", "all_to_all", "all_to_all_single", "broadcast",
    "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend",
    "irecv", "batch_isend_irecv", "send_object_list", "recv_object_list", "init_process_group",
    "destroy_process_group", "new_group",
}
COMM_MODULES = ("torch.distributed", "deepspeed.comm")


def direct_collective_calls(source: str, filename: str = "<snippet>") -> list[str]:
    """'file:line name' for each call of a torch.distributed / deepspeed.comm collective in `source`,
    whatever the import spelling (import ... as, from ... import ..., the full dotted path)."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> dotted origin
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        parts, f = [], node.func
        while isinstance(f, ast.Attribute):
            parts.append(f.attr)
            f = f.value
        if not isinstance(f, ast.Name) or f.id not in aliases:
            continue
        dotted = ".".join([aliases[f.id], *reversed(parts)])
        module, _, name = dotted.rpartition(".")
        if name in COLLECTIVES and any(module == m or module.startswith(m + ".") for m in COMM_MODULES):
            found.append(f"{filename}:{node.lineno} {dotted}")
    return found


def test_the_checker_catches_every_spelling_of_a_direct_collective():
    planted = textwrap.dedent("""
        import torch
        import torch.distributed as dist
        from torch import distributed as tdist
        from torch.distributed import barrier as wait_all
        import deepspeed.comm as dscomm

        def f(t, objs):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            tdist.all_gather_object(objs, 1)
            torch.distributed.broadcast(t, src=0)
            wait_all()
            dscomm.barrier()
            dist.get_rank(); dist.is_initialized(); t.all_reduce()   # not collectives / not torch.distributed
    """)
    found = direct_collective_calls(planted)
    assert [f.split(" ")[1] for f in found] == [
        "torch.distributed.all_reduce", "torch.distributed.all_gather_object", "torch.distributed.broadcast",
        "torch.distributed.barrier", "deepspeed.comm.barrier"], found
    clean = "from notellm2.launcher.distributed import all_reduce, barrier\nall_reduce(t)\nbarrier()\n"
    assert direct_collective_calls(clean) == []


def test_no_file_under_launcher_calls_a_collective_directly():
    root = os.path.join(REPO, "launcher")
    found, checked = [], 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, REPO)
            if not name.endswith(".py") or rel == os.path.join("launcher", "distributed.py"):
                continue
            with open(path) as fh:
                found += direct_collective_calls(fh.read(), rel)
            checked += 1
    assert checked > 20  # the walk did reach the package
    assert not found, ("collectives must go through launcher/distributed.py (device-aware for NCCL): "
                       + "; ".join(found))


@pytest.mark.parametrize("backend,local_rank,expected", [
    ("gloo", 3, "cpu"), ("GLOO", 0, "cpu"), ("mpi", 1, "cpu"),
    ("nccl", 0, "cuda:0"), ("nccl", 3, "cuda:3"),
    ("cpu:gloo,cuda:nccl", 2, "cpu"), ("cuda:nccl", 1, "cuda:1"),
])
def test_collective_device_per_backend(backend, local_rank, expected):
    assert D.collective_device(backend, local_rank) == torch.device(expected)


@pytest.mark.parametrize("backend", ["hccl", "", "cpu:nccl", "cuda:gloo", "cpu:gloo,tpu:xla", "cuda:"])
def test_collective_device_refuses_unknown_backends_in_one_line(backend):
    with pytest.raises(ValueError, match="collective backend") as info:
        D.collective_device(backend, 0)
    assert "\n" not in str(info.value)


def test_collective_device_takes_the_local_rank_from_the_environment(monkeypatch):
    monkeypatch.setattr(D, "_bound_local_rank", None)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.collective_device("nccl") == torch.device("cuda", 1)
    monkeypatch.setattr(D, "_bound_local_rank", 2)  # what init_distributed set wins
    assert D.collective_device("nccl") == torch.device("cuda", 2)


def test_helpers_without_a_process_group_are_one_rank():
    t = torch.tensor([1.5, 2.0], dtype=torch.float64)
    assert D.all_reduce(t) is t and t.tolist() == [1.5, 2.0]
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    assert D.gather_object("x") == ["x"]
    assert D.broadcast_object_list([3]) == [3]
    D.barrier()
    assert D.collective_device() == torch.device("cpu")


@pytest.mark.slow
def test_helpers_on_two_gloo_ranks():
    res = run_ranks("tests.launcher.train.collective_cases:helpers_on_gloo", nproc=2, timeout=120)
    for rank in (0, 1):
        r = res.returns[rank]
        assert r["device"] == "cpu"
        assert r["same_object"] and r["dtype"] == "torch.float64"
        assert r["sums"][0] == pytest.approx(0.1 + 0.2, abs=1e-15)
        assert r["sums"][1] == pytest.approx(3e-300, rel=1e-12)  # float64: would be 0 in float32
        assert r["flag"] == [True, 1]
        assert r["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert r["box"] == ["from 0", 0]
        assert r["should_stop"][:2] == [False, True]  # preemption's MAX all-reduce: one rank asked, both stop
    assert res.returns[0]["should_stop"][2] == "another rank was asked to stop"
    assert res.returns[0]["to_zero"] == ["r0", "r1"] and res.returns[1]["to_zero"] is None


# ----------------------------------------------------------------------------- crash traces

class _Stop(Exception):
    pass


def _raise_stop(*args, **kwargs):
    raise _Stop


def test_trainer_entry_turns_faulthandler_on_before_anything_else(monkeypatch):
    import notellm2.launcher.train.train as T
    from notellm2.launcher.config import config_from_dict

    monkeypatch.setattr(T, "detect_topology", _raise_stop)  # the step after the crash traces
    faulthandler.disable()
    try:
        with pytest.raises(_Stop):
            T.train(config_from_dict({}))
        assert faulthandler.is_enabled()
    finally:
        faulthandler.enable(file=sys.__stderr__, all_threads=True)


def test_embed_entry_turns_faulthandler_on(monkeypatch):
    from notellm2.launcher.cli import embed as E
    from notellm2.errors import UserError

    import argparse

    monkeypatch.setattr(D, "detect_topology", _raise_stop)
    faulthandler.disable()
    try:
        # no --model and no --config: the verb refuses at once, after turning faulthandler on first
        with pytest.raises((UserError, _Stop)):
            E._run(argparse.Namespace(model=None, config=None, overrides=[], mode="both", shards=None, out="unused",
                                      batch_size=1, num_workers=0))
        assert faulthandler.is_enabled()
    finally:
        faulthandler.enable(file=sys.__stderr__, all_threads=True)


def test_a_segfault_prints_every_threads_python_stack():
    child = textwrap.dedent("""
        import ctypes, threading, time
        from notellm2.launcher.distributed import enable_crash_traces

        def loader_thread_waits():
            time.sleep(60)

        def crash_in_main():
            ctypes.string_at(0)

        enable_crash_traces()
        threading.Thread(target=loader_thread_waits, daemon=True).start()
        time.sleep(0.2)
        crash_in_main()
    """)
    env = base_env()
    env.pop("PYTHONFAULTHANDLER", None)  # only the helper may turn it on
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert out.returncode != 0
    assert "Fatal Python error: Segmentation fault" in out.stderr, out.stderr
    assert "crash_in_main" in out.stderr and "Current thread" in out.stderr, out.stderr
    assert "loader_thread_waits" in out.stderr, out.stderr  # all threads, not only the crashing one


# ----------------------------------------------------------------------------- host -> device copies

def test_non_blocking_only_from_pinned_memory_to_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    assert copy_can_be_async(cpu, True, cuda)
    assert not copy_can_be_async(cpu, False, cuda)  # pageable: CUDA stages it synchronously anyway
    assert not copy_can_be_async(cpu, True, cpu)
    assert not copy_can_be_async(cuda, False, cpu)  # device -> host must be complete before it is read
    assert not copy_can_be_async(cuda, True, cpu)
    assert copy_can_be_async("cpu", True, "cuda")


def test_move_batch_on_cpu_keeps_values_and_normalises_pixels():
    batch = {"input_ids": torch.arange(6).view(2, 3), "image_present": torch.tensor([True, False]),
             "pixel_values": torch.full((2, 3, 2, 2), 255, dtype=torch.uint8), "note_id_strs": ["a", "b"]}
    out = move_batch(batch, torch.device("cpu"))
    assert torch.equal(out["input_ids"], batch["input_ids"]) and out["note_id_strs"] == ["a", "b"]
    assert out["pixel_values"].dtype.is_floating_point


class _RecordingTensor(torch.Tensor):
    """A CPU tensor that says whether it is pinned and records how `.to` was called (no CUDA needed)."""

    pinned = False
    calls: list = []

    def is_pinned(self, *args, **kwargs):
        return self.pinned

    def to(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self


@pytest.mark.parametrize("pinned,target,expected", [
    (True, torch.device("cuda", 0), True), (False, torch.device("cuda", 0), False), (True, torch.device("cpu"), False)])
def test_move_batch_passes_non_blocking_from_the_decision(pinned, target, expected):
    t = torch.Tensor._make_subclass(_RecordingTensor, torch.zeros(2))
    t.pinned, t.calls = pinned, []
    move_batch({"input_ids": t}, target)
    assert t.calls == [((target,), {"non_blocking": expected})]
