"""A model worker's interpreter, started before anything else is imported.

`appliance serve` spends ~0.25 s importing its settings layer (pydantic-settings) before it knows which model
to load, and a worker spends ~0.35 s starting Python and importing llama.cpp's bindings before it can load
one. Started first (`appliance/__main__.py`), the worker does its part while the API process does its own,
then waits for its spec on the pipe; a serve that needs no such worker (another default model, a bad
setting) closes the pipe and the child exits. Only the standard library here: this runs before the rest.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe

WORKER_MAIN = "appliance.backends.llamacpp.worker_main"


@dataclass
class Launched:
    """A worker's interpreter and the parent's end of its pipe: `sys.path` sent, its spec not yet."""

    proc: subprocess.Popen
    conn: Connection
    taken: bool = False

    def take(self) -> tuple[subprocess.Popen, Connection]:
        self.taken = True
        return self.proc, self.conn

    def discard(self) -> None:
        """Close the pipe of a worker nobody took: it exits as soon as its imports are done."""
        if not self.taken:
            self.taken = True
            self.conn.close()
            threading.Thread(target=self.proc.wait, name="prestarted-reaper", daemon=True).start()  # no zombie


def launch() -> Launched:
    """`python -m appliance.backends.llamacpp.worker_main FD` with the parent's `sys.path` on the pipe."""
    conn, child = Pipe()
    fd = child.fileno()
    proc = subprocess.Popen([sys.executable, "-m", WORKER_MAIN, str(fd)], pass_fds=(fd,), stdin=subprocess.DEVNULL)
    child.close()
    conn.send(list(sys.path))  # waits in the pipe until the child reads it
    return Launched(proc, conn)
