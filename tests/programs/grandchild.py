# A program worker with a child of its own: both serve on descriptor 3 (blocking, as systemd
# passes it), and both stop on SIGTERM by Python's default action.
import os
import socket

listener = socket.socket(fileno=3)
listener.setblocking(True)
os.fork()
while True:
    conn, _ = listener.accept()
    conn.recv(1024)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n")
    conn.close()
