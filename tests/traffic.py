#!/usr/bin/python3
"""Test traffic between pods: a TCP bulk transfer checked by SHA-256, and numbered UDP datagrams.

tcp-server PORT OUT        accept one connection, write the SHA-256 and byte count of what came to OUT
tcp-client HOST PORT MB    send MB MiB of seeded pseudo-random bytes, print their SHA-256
udp-server PORT COUNT OUT  receive up to COUNT datagrams (5 s idle timeout), write how many were intact
udp-client HOST PORT COUNT send COUNT numbered datagrams
"""
import hashlib
import random
import socket
import sys


def tcp_server(port, out):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(1)
    c, _ = s.accept()
    h, n = hashlib.sha256(), 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
    open(out, "w").write(f"{h.hexdigest()} {n}\n")


def tcp_client(host, port, mb):
    rng = random.Random(7)
    c = socket.create_connection((host, int(port)), timeout=60)
    h = hashlib.sha256()
    for _ in range(int(mb)):
        b = rng.randbytes(1 << 20)
        h.update(b)
        c.sendall(b)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    print(f"{h.hexdigest()} {int(mb) << 20}")


def payload(i):
    return (f"datagram {i} ".encode() * 20)[:200]


def udp_server(port, count, out):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(port)))
    s.settimeout(5)
    good = 0
    try:
        for _ in range(int(count)):
            b, _ = s.recvfrom(2048)
            i = int(b.split(b" ")[1])
            good += b == payload(i)
    except socket.timeout:
        pass
    open(out, "w").write(f"{good}\n")


def udp_client(host, port, count):
    import time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(int(count)):
        s.sendto(payload(i), (host, int(port)))
        time.sleep(0.001)


if __name__ == "__main__":
    {"tcp-server": tcp_server, "tcp-client": tcp_client,
     "udp-server": udp_server, "udp-client": udp_client}[sys.argv[1]](*sys.argv[2:])
