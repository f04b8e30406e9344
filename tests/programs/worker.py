"""A program worker for the tests: any program, as netcluster runs it.

It prints one `report {json}` line with what it was given (pid, LISTEN_PID, LISTEN_FDS,
LISTEN_FDNAMES, every open descriptor), says READY=1 on NOTIFY_SOCKET, and serves the seeds'
echo protocol (`hello\\r\\n`, then every byte back) on each listener with
`socket.socket(fileno=N)`. On SIGTERM it stops accepting and exits once its connections end.

Environment knobs: FAIL_IF=PATH exits 1 at once when PATH exists; NOT_READY_IF=PATH never says
READY=1 when PATH exists; NO_NOTIFY=1 never says it.
"""
import json
import os
import signal
import socket
import sys
import threading

fail = os.environ.get("FAIL_IF")
if fail and os.path.exists(fail):
    print("failing on purpose", file=sys.stderr, flush=True)
    sys.exit(1)

count = int(os.environ.get("LISTEN_FDS", "0"))
fds = {}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    except OSError:
        pass  # the directory's own descriptor, closed by now
print("report " + json.dumps({
    "pid": os.getpid(),
    "listen_pid": os.environ.get("LISTEN_PID"),
    "listen_fds": count,
    "names": os.environ.get("LISTEN_FDNAMES"),
    "fds": fds,
}), flush=True)

listeners = [socket.socket(fileno=3 + i) for i in range(count)]
stopping = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopping.set())

not_ready = os.environ.get("NOT_READY_IF")
if (os.environ.get("NOTIFY_SOCKET") and os.environ.get("NO_NOTIFY") != "1"
        and not (not_ready and os.path.exists(not_ready))):
    u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    u.sendto(b"READY=1\nSTATUS=serving", os.environ["NOTIFY_SOCKET"])


def echo(conn):
    with conn:
        conn.sendall(b"hello\r\n")
        while True:
            data = conn.recv(4096)
            if not data:
                return
            conn.sendall(data)


def serve(listener):
    listener.settimeout(0.05)
    while not stopping.is_set():
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        threading.Thread(target=echo, args=(conn,)).start()


threads = [threading.Thread(target=serve, args=(l,)) for l in listeners]
for t in threads:
    t.start()
for t in threads:
    t.join()
