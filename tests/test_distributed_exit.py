"""A multi-process run ends through `llava.train.distributed.end_distributed_run`: the ranks leave together,
exit handlers run, and the interpreter is never finalized (where gloo's worker threads can abort the process,
see that module), so the exit code is 0.

Each rank registers an exit handler and holds an object whose `__del__` runs only during finalization; each
leaves a marker file. Rank 0 joins its last collective a second late, so rank 1 must wait for it at the barrier.
"""

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from llava.tiny.fixtures import free_port
from llava.train.distributed import end_distributed_run, is_multi_process


def _two_ranks(out, mode: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           __file__, mode, str(out)]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)


def test_single_process_returns():
    assert not is_multi_process()
    end_distributed_run()  # no process group: returns (pytest would end here otherwise)


@pytest.mark.slow
def test_ranks_run_exit_handlers_and_skip_finalization(tmp_path):
    plain = _two_ranks(tmp_path / "plain", "plain")  # control: an ordinary end finalizes
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "plain")) == ["atexit_0", "atexit_1", "finalized_0", "finalized_1"]
    ended = _two_ranks(tmp_path / "ended", "ended")
    assert ended.returncode == 0, ended.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "ended")) == ["atexit_0", "atexit_1"]


class _Finalized:
    def __init__(self, path: str):
        self.path = path

    def __del__(self, _open=open):  # bound now: finalization empties modules (builtins too) first
        _open(self.path, "w").close()


def _rank(mode: str, out: str) -> None:
    import atexit

    os.makedirs(out, exist_ok=True)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    atexit.register(lambda: open(os.path.join(out, f"atexit_{rank}"), "w").close())
    globals()["finalized"] = _Finalized(os.path.join(out, f"finalized_{rank}"))
    if rank == 0:
        time.sleep(1)
    parts = [torch.empty(4) for _ in range(2)]
    work = dist.all_gather(parts, torch.full((4,), float(rank)), async_op=True)  # rank 1 leaves it in flight
    del parts, work
    if mode == "ended":
        end_distributed_run()


if __name__ == "__main__":  # one rank of the test above
    _rank(sys.argv[1], sys.argv[2])
