"""A dead process never hangs the others of a multi-process run.

A collective (gloo on CPU) waits forever for a peer that died mid-step. JAX's own failure detection, heartbeats
to its coordination service, ends the survivors only after the heartbeat timeout, with an abort and a page of
stack trace; and when process 0 dies, the service it hosts dies with it and the others abort at once, the same
way. So process 0 starts a *hub*: a small process (``python -m stem_jax.peers``) that hosts the coordination
service and a TCP endpoint to which every process of the run holds one connection. A connection that closes
without a goodbye is a process that died (kill -9, out of memory, a crash, an error exit): the hub tells every
other process, which prints one line and exits at once (no shutdown barrier), and the hub ends when all have
gone. The service outlives process 0, so no process sees it vanish first. A lost host (no TCP close) is
still caught by the heartbeats (``--heartbeat_timeout``), with JAX's abort.
"""
from __future__ import annotations

import atexit
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

HUB_KEY = "stem_jax/peer_hub"  # the hub's TCP port, in JAX's key-value store
_EXITING = threading.Lock()


def exit_now(line: str, code: int) -> None:
    """Print ``line`` to stderr and end the process at once, from any thread: no atexit handlers, so no
    JAX shutdown barrier (which would wait for peers blocked in a collective with this process). The first
    caller wins; a second (the main thread and the watcher at once) waits for the end."""
    if not _EXITING.acquire(blocking=False):
        threading.Event().wait()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os.write(2, (line + "\n").encode())
        os._exit(code)


class _NoService:
    """Stands in for the coordination service in process 0 while the hub hosts the real one."""

    def shutdown(self) -> None:
        pass


def start_hub(bind_address: str, num_processes: int, heartbeat_timeout: int, init_timeout: int) -> int:
    """Start the hub (service on ``bind_address``); return its TCP port once it listens."""
    hub = subprocess.Popen([sys.executable, "-m", "stem_jax.peers", bind_address, str(num_processes),
                            str(heartbeat_timeout), str(init_timeout)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    line = hub.stdout.readline()  # written once the service and the endpoint are up
    hub.stdout.close()
    if not line.strip().isdigit():
        raise RuntimeError(f"the peer hub (the coordination service on {bind_address}) did not start: "
                           f"{line.removeprefix('error ').strip() or f'exit code {hub.wait()}'}")
    return int(line)


def initialize(initialize_jax: Callable[..., None], process_id: int, num_processes: int, coordinator_address: str,
               heartbeat_timeout: int, on_peer_death: Callable[[str], None], **kwargs) -> None:
    """``initialize_jax`` (``jax.distributed.initialize``) with the service in the hub, then this process's
    connection to the hub: ``on_peer_death(message)`` runs (on a thread) when another process dies."""
    from jax._src.lib import _jax  # the service's constructor: process 0 must not start one of its own
    port = None
    if process_id == 0:
        bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", "[::]:" + coordinator_address.rsplit(":", 1)[1])
        port = start_hub(bind, num_processes, heartbeat_timeout, kwargs.get("initialization_timeout", 300))
        make = _jax.get_distributed_runtime_service
        _jax.get_distributed_runtime_service = lambda *a, **kw: _NoService()
    try:
        initialize_jax(coordinator_address=coordinator_address, num_processes=num_processes,
                       process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout, **kwargs)
    finally:
        if process_id == 0:
            _jax.get_distributed_runtime_service = make
    from jax._src import distributed
    client = distributed.global_state.client
    if process_id == 0:
        client.key_value_set(HUB_KEY, str(port))
    else:
        port = int(client.blocking_key_value_get(HUB_KEY, 1000 * kwargs.get("initialization_timeout", 300)))
    host = coordinator_address.rsplit(":", 1)[0].strip("[]")
    _watch(socket.create_connection((host, port), timeout=60), process_id, on_peer_death)


def _watch(conn: socket.socket, process_id: int, on_peer_death: Callable[[str], None]) -> None:
    conn.settimeout(None)
    conn.sendall(f"hello {process_id}\n".encode())
    leaving = threading.Event()

    def goodbye() -> None:  # a normal exit (atexit runs before JAX's shutdown, registered earlier)
        if failed.is_set():
            return
        leaving.set()
        try:
            conn.sendall(b"bye\n")
        except OSError:
            pass

    def listen() -> None:
        data = b""
        while b"\n" not in data:
            try:
                chunk = conn.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                data += b"abort the peer hub (in process 0's host) is gone\n"
                break
            data += chunk
        if not leaving.is_set():
            on_peer_death(data.split(b"\n", 1)[0].decode(errors="replace").removeprefix("abort "))

    failed = threading.Event()
    hook = sys.excepthook

    def uncaught(*exc) -> None:  # an error exit: the traceback, then out at once, without a goodbye
        failed.set()
        hook(*exc)
        exit_now("error: this process of a multi-process run failed (traceback above)", 1)

    sys.excepthook = uncaught
    atexit.register(goodbye)
    threading.Thread(target=listen, name="peer-watch", daemon=True).start()


def _serve(bind_address: str, num_processes: int, heartbeat_timeout: int, init_timeout: int) -> None:
    """The hub: the coordination service, and the endpoint that turns a closed connection into an abort."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # it ends when the processes have gone
        signal.signal(sig, signal.SIG_IGN)
    try:
        from jax._src.lib import _jax
        service = _jax.get_distributed_runtime_service(bind_address, num_processes,
                                                       heartbeat_timeout=heartbeat_timeout)
        if socket.has_dualstack_ipv6():
            server = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            server = socket.create_server(("", 0))
    except Exception as e:  # noqa: BLE001 - reported by process 0 as one line
        print("error " + " ".join(str(e).split())[:300], flush=True)
        return
    print(server.getsockname()[1], flush=True)
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ)
    conns: dict[socket.socket, dict] = {}
    seen, aborting, started = 0, False, time.monotonic()
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj is server:
                conn, _ = server.accept()
                conns[conn] = {"who": "a process", "bye": False, "buf": b""}
                sel.register(conn, selectors.EVENT_READ)
                seen += 1
                continue
            conn, state = key.fileobj, conns[key.fileobj]
            try:
                chunk = conn.recv(4096)
            except OSError:
                chunk = b""
            state["buf"] += chunk
            for line in state["buf"].split(b"\n")[:-1]:
                if line.startswith(b"hello "):
                    state["who"] = f"process {line.split()[1].decode()}"
                elif line == b"bye":
                    state["bye"] = True
            state["buf"] = state["buf"].rsplit(b"\n", 1)[-1]
            if chunk:
                continue
            sel.unregister(conn)
            conn.close()
            del conns[conn]
            if not state["bye"] and not aborting:
                aborting = True
                for other in conns:
                    try:
                        other.sendall(f"abort {state['who']} died or failed\n".encode())
                    except OSError:
                        pass
        everyone_left = not conns and (seen == num_processes or aborting)
        never_came = not conns and time.monotonic() - started > init_timeout + 60
        if everyone_left or never_came:
            os._exit(0)  # the service goes with it: no process is left to use it
    del service


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
