# A program that daemonizes, as old-style servers do: it forks, the child leaves the process
# group and session (setsid) and serves on descriptor 3, and the parent exits at once. Run by
# netcluster, every start leaves such a child behind unless the primary contains it.
import os
import socket

if os.fork() > 0:
    os._exit(0)
os.setsid()
listener = socket.socket(fileno=3)
listener.setblocking(True)
while True:
    conn, _ = listener.accept()
    conn.recv(1024)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n")
    conn.close()
