"""A model worker's entry point: `python -m appliance.backends.llamacpp.worker_main FD` (process.py starts it).

FD is the worker's end of the pipe; the parent's `sys.path` and the worker's spec come first on it, then
`worker.main` serves. Nothing here imports llama.cpp before the path is the parent's; then it is imported
before the spec is read, which a prestarted worker's parent sends only once it knows it.
"""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection


def run(fd: int) -> None:
    conn = Connection(fd)
    sys.path[:] = conn.recv()
    from appliance.backends.llamacpp.worker import main, preload

    preload()  # llama.cpp's bindings, while a prestarted worker's parent is still working out the spec
    try:
        spec = conn.recv()
    except EOFError:  # a prestarted interpreter that was not needed (appliance/prestart.py)
        return
    main(conn, spec)


if __name__ == "__main__":
    run(int(sys.argv[1]))
