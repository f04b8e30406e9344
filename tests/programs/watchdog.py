# A program worker with a watchdog: it says READY=1, then WATCHDOG=1 every half interval, and
# serves on descriptor 3. The first worker of slot 1 (marked by the file $HANG_MARK) stops
# pinging after a second and hangs: it neither pings nor accepts any more.
import os
import socket
import time

interval = int(os.environ["WATCHDOG_USEC"]) / 1e6
assert os.environ.get("WATCHDOG_PID") == str(os.getpid()), "WATCHDOG_PID is this process"
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)


def say(what):
    notify.sendto(what, os.environ["NOTIFY_SOCKET"])


mark = os.environ["HANG_MARK"]
hang = os.environ.get("NETCLUSTER_SLOT") == "1" and not os.path.exists(mark)
if hang:
    open(mark, "w").close()
listener = socket.socket(fileno=3)
listener.settimeout(0.05)
say(b"READY=1")
started = last = time.monotonic()
while True:
    now = time.monotonic()
    if hang and now - started > 1.0:
        time.sleep(3600)  # hung: no ping, no accept
    if now - last >= interval / 2:
        say(b"WATCHDOG=1")
        last = now
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        continue
    conn.settimeout(5)
    conn.recv(1024)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n")
    conn.close()
