"""Stage processes forked from a preloaded interpreter (kondense_jobs.zygote), with Popen's interface.

`kondense run` starts one `python -m kondense_jobs.zygote` per run, which imports torch and
transformers once; each stage that qualifies is then a fork of it instead of a fresh interpreter
that imports them again (about 8 s per stage on 2 cores). What runs in the child is the very
command the stage would run (`python -m kondense_jobs <kind> ...`, through runpy), so its output,
termination message and exit code are the same.

A stage qualifies when it is one process (the launcher's workers are torchrun's business) and the
machine has no GPU device: CUDA cannot be used in a child forked from a process that initialised
it, and next to GPU work the import time does not matter. KONDENSE_PRELOAD=0 turns it off; if the
zygote cannot start or dies, stages start as plain processes again.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import IO

ENV = "KONDENSE_PRELOAD"
READY_TIMEOUT = 120.0


def gpu_devices() -> bool:
    """Whether the machine shows an accelerator to processes (NVIDIA or AMD device files)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def wanted(env: dict[str, str] | None = None) -> bool:
    """Preloading is on unless KONDENSE_PRELOAD=0, and possible only where fork and fd passing are
    (Linux) and no GPU device is present."""
    value = (env or os.environ).get(ENV, "1").strip().lower()
    return value not in ("0", "false", "no", "off") and hasattr(socket, "send_fds") and sys.platform == "linux" and not gpu_devices()


class Forked:
    """A child of the zygote, as far as the runner uses a subprocess.Popen: pid, stdout, poll(),
    wait(), kill() (and send_signal())."""

    def __init__(self, zygote: Zygote, rid: int, stdout: IO[str]):
        self.zygote, self.rid, self.stdout = zygote, rid, stdout
        self.pid: int | None = None
        self.returncode: int | None = None
        self.started = threading.Event()
        self.ended = threading.Event()
        self.error: str | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"stage {self.pid}", timeout)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.pid is not None and self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _ended(self, code: int) -> None:
        self.returncode = code
        self.ended.set()


class Zygote:
    """One preloaded interpreter for a run: spawn() forks a stage from it; close() lets it go."""

    def __init__(self, python: str, env: dict[str, str], log: IO[str]):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [python, "-m", "kondense_jobs.zygote", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        theirs.close()
        self.lock = threading.Lock()
        self.children: dict[int, Forked] = {}
        self.next_id = 0
        self.ready = threading.Event()
        self.alive = True
        self.preload_seconds: float | None = None
        self.reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            if message.get("ready"):
                self.preload_seconds = message.get("seconds")
                self.ready.set()
                continue
            child = self.children.get(message.get("id"))
            if child is None:
                continue
            if "pid" in message:
                child.pid = message["pid"]
                child.started.set()
            elif "exit" in message:
                with self.lock:
                    self.children.pop(child.rid, None)
                child._ended(int(message["exit"]))
            elif "error" in message:
                child.error = message["error"]
                child.started.set()
        # The zygote is gone. A child it still ran cannot report its exit: the stage failed here.
        self.alive = False
        self.ready.set()
        with self.lock:
            orphans, self.children = list(self.children.values()), {}
        for child in orphans:
            child.error = child.error or "the preloaded interpreter exited"
            child.started.set()
            child._ended(1)

    def spawn(self, module: str, args: list[str]) -> Forked | None:
        """Fork `python -m module *args`; None when the zygote cannot (the caller starts a process)."""
        if not self.ready.wait(READY_TIMEOUT) or not self.alive:
            return None
        read_end, write_end = os.pipe()
        with self.lock:
            self.next_id += 1
            child = Forked(self, self.next_id, os.fdopen(read_end, "r", buffering=1, encoding="utf-8", errors="replace"))
            self.children[child.rid] = child
        try:
            socket.send_fds(self.sock, [json.dumps({"id": child.rid, "module": module, "args": args}).encode()], [write_end])
        except OSError:
            with self.lock:
                self.children.pop(child.rid, None)
            child.stdout.close()
            return None
        finally:
            os.close(write_end)
        child.started.wait()
        if child.pid is None:
            with self.lock:
                self.children.pop(child.rid, None)
            child.stdout.close()
            return None
        return child

    def close(self, timeout: float = 30.0) -> None:
        """Let the zygote go: it exits once the children it started have ended (at once while it
        is still importing)."""
        if not self.ready.is_set():
            self.proc.kill()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()


def module_of(cmd: list[str]) -> tuple[str, list[str]] | None:
    """("kondense_jobs", args) for a command `<python> -m kondense_jobs ...`; None for anything else."""
    if len(cmd) >= 3 and cmd[1] == "-m" and cmd[2] == "kondense_jobs":
        return cmd[2], cmd[3:]
    return None

