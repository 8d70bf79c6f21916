"""The end of a multi-process run: every rank leaves together, exit handlers run, and the process exits 0.

Why a process cannot simply return (measured: a core dump of the SIGABRT "terminate called without an active
exception" after all work was done; torch 2.13, CPython 3.11, gloo):
- A gloo worker thread (`ProcessGroupGloo::runLoop`) frees each finished collective after the caller's
  `wait()` has returned. When Python has already dropped the collective's tensors (DeepSpeed's gathered
  parameter buffers, DDP's buckets, `all_gather_object`'s byte tensors), freeing them needs the GIL.
- During interpreter finalization CPython 3.11 ends any thread that asks for the GIL with `pthread_exit`; its
  forced unwind through the worker's noexcept C++ frames is `std::terminate`: SIGABRT, exit code -6, and a
  failed job although every file was written (about one two-process run in ten to fifty here).
- `destroy_process_group()` does not stop those threads: gloo's `shutdown` is a no-op and the threads are
  joined only when the last reference to the group goes, which DeepSpeed, DDP and accelerate keep until
  finalization itself.

So a multi-process entry point ends with `end_distributed_run()`: a barrier (no rank leaves while another
still needs it; gloo's barrier also waits for every collective queued before it), the process groups
destroyed, the interpreter's exit handlers run while it is whole (logging's flush, wandb's upload, ...), the
standard streams flushed, and then `os._exit`, which skips finalization and with it the window above.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_multi_process() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def end_distributed_run(exit_code: int = 0) -> None:
    """Leave a multi-process run cleanly (see the module docstring); returns at once in a single process.

    Call it from an entry point's `__main__` block after its work succeeded, never from library code: in a
    multi-process run the process ends here."""
    if not is_multi_process():
        return
    dist.barrier()
    dist.destroy_process_group()
    logger.info("All processes finished; process groups destroyed")
    atexit._run_exitfuncs()  # what finalization would run first: logging.shutdown, wandb's finish, ...
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(exit_code)
