"""A preloaded interpreter that forks stage processes: `kondense run`'s quick start on a CPU.

Each stage process spends its first seconds importing torch and transformers (about 8 s of a
2-core machine); the demo's six stages spent most of a minute on it. `kondense run` instead starts
`python -m kondense_jobs.zygote FD` once per run: it imports those libraries (it makes no tensor,
starts no torch thread pool and never touches a GPU), then, for each request on the socket FD,
forks a child that runs `python -m <module> <args>` exactly as the interpreter would (runpy, as
__main__, with sys.argv set), its stdout and stderr on the pipe the request carried, and reports
the child's pid and then its exit status. The runner (kondense.preload) keeps Popen's interface
for it, and falls back to a plain process where preloading does not apply (see there).

The protocol: one JSON message per datagram on an AF_UNIX SOCK_SEQPACKET socket.

    runner -> zygote   {"id": n, "module": "kondense_jobs", "args": [...]}  + one fd: the output pipe
    zygote -> runner   {"ready": true, "seconds": s}                        once, after the imports
                       {"id": n, "pid": p}                                  the child started
                       {"id": n, "exit": code}                              it ended (-signal if killed)
                       {"id": n, "error": "..."}                            it could not be started

The zygote ignores SIGINT, so that Ctrl-C (SIGINT to the terminal's process group) reaches the
children, which take the stage's own interrupt path; when the runner closes its end, the zygote
waits for the children it started, reports what it can, and exits.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import random
import runpy
import select
import signal
import socket
import sys
import threading
import time
import traceback

# Imported once here and shared by every child (copy-on-write). Only modules every stage imports,
# none that spawns threads of its own on import or probes a GPU (bitsandbytes, vLLM, llama.cpp).
PRELOAD = (
    "numpy",
    "torch",
    "transformers",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "safetensors.torch",
    "kondense.api",
    "kondense_jobs.runtime",
)
MAX_MESSAGE = 1 << 16


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)


def serve(sock: socket.socket) -> None:
    """Fork a child per request until the runner closes its end and every child has ended."""
    running: dict[int, int] = {}  # pid -> request id
    listening = True
    while listening or running:
        if listening:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
                if not data:
                    listening = False
                else:
                    _start(sock, json.loads(data), fds, running)
        else:
            time.sleep(0.05)
        _reap(sock, running)


def _send(sock: socket.socket, message: dict) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:  # the runner is gone: nobody to tell
        pass


def _start(sock: socket.socket, request: dict, fds: list[int], running: dict[int, int]) -> None:
    rid = request.get("id")
    if len(fds) != 1 or not isinstance(request.get("module"), str) or not isinstance(request.get("args"), list):
        for fd in fds:
            os.close(fd)
        _send(sock, {"id": rid, "error": "a request is {id, module, args} with one file descriptor"})
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the loop
        code = 1
        try:
            sock.close()
            os.dup2(fds[0], 1)
            os.dup2(fds[0], 2)
            os.close(fds[0])
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _reseed()
            code = run_module(request["module"], request["args"])
        finally:
            os._exit(code)
    os.close(fds[0])
    running[pid] = rid
    _send(sock, {"id": rid, "pid": pid})


def _reseed() -> None:
    """Fresh random state, as a new interpreter has (random, numpy and torch seed themselves from
    the system's entropy at start): else every child would draw the zygote's numbers."""
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()  # the CPU generator; CUDA's is seeded lazily, never initialised here


def _reap(sock: socket.socket, running: dict[int, int]) -> None:
    while running:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        rid = running.pop(pid, None)
        if rid is not None:
            _send(sock, {"id": rid, "exit": os.waitstatus_to_exitcode(status)})


def run_module(module: str, args: list[str]) -> int:
    """`python -m module *args` in this process, up to the exit code the interpreter would give:
    SystemExit's code, 1 after an uncaught exception's traceback, 130 after an uncaught Ctrl-C;
    then what interpreter shutdown does: join the threads that are not daemons, run atexit."""
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 - reported as the interpreter would, then exit 1
        traceback.print_exc()
        code = 1
    try:
        for thread in threading.enumerate():
            if thread is threading.main_thread() or thread.daemon:
                continue
            try:
                thread.join()
            except RuntimeError:  # a Ctrl-C interrupted its start(): it never ran, nothing to wait for
                pass
    except KeyboardInterrupt:  # a second Ctrl-C stops the wait, as it stops python's
        code = 130
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m kondense_jobs.zygote FD  (FD: an AF_UNIX SOCK_SEQPACKET socket; kondense run starts it)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    started = time.monotonic()
    preload()
    _send(sock, {"ready": True, "seconds": round(time.monotonic() - started, 2)})
    serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
