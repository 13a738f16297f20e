#!/usr/bin/python3
"""Test traffic between pods: a TCP bulk transfer checked by SHA-256, and numbered UDP datagrams.

tcp-server PORT OUT        accept one connection, write the SHA-256 and byte count of what came to OUT
tcp-client HOST PORT MB    send MB MiB of seeded pseudo-random bytes, print their SHA-256
udp-server PORT COUNT OUT  receive up to COUNT datagrams (5 s idle timeout), write how many were intact
udp-client HOST PORT COUNT send COUNT numbered datagrams
echo-server PORT SECS      echo on every TCP connection accepted within SECS seconds
connect HOST PORT          try one TCP connection (2 s), print "connected" or why not
stream HOST PORT SECS      one TCP connection: 16 bytes every 50 ms for SECS seconds, each echo
                           awaited (1 s at most); print the Unix times of the echoes as JSON
"""
import hashlib
import random
import socket
import sys


def tcp_server(port, out):
    # Both families: IPv4 clients arrive as IPv4-mapped addresses.
    s = socket.create_server(("::", int(port)), family=socket.AF_INET6, dualstack_ipv6=True)
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


def echo_server(port, secs):
    import threading
    import time
    s = socket.create_server(("::", int(port)), family=socket.AF_INET6, dualstack_ipv6=True,
                             backlog=16)
    s.settimeout(0.2)
    end = time.time() + float(secs)

    def echo(c):
        c.settimeout(float(secs))
        try:
            while b := c.recv(4096):
                c.sendall(b)
        except OSError:
            pass
        c.close()

    while time.time() < end:
        try:
            c, _ = s.accept()
        except socket.timeout:
            continue
        threading.Thread(target=echo, args=(c,), daemon=True).start()


def connect(host, port):
    try:
        c = socket.create_connection((host, int(port)), timeout=2)
        c.sendall(b"hello")
        c.settimeout(2)
        print("connected" if c.recv(5) == b"hello" else "no echo")
    except OSError as e:
        print(f"failed: {e}")


def stream(host, port, secs):
    import json
    import time
    c = socket.create_connection((host, int(port)), timeout=2)
    c.settimeout(1)
    end, echoes, pending = time.time() + float(secs), [], b""
    while time.time() < end:
        c.sendall(b"0123456789abcdef")
        pending += b"0123456789abcdef"
        try:
            while pending:
                got = c.recv(4096)
                if not got:
                    raise OSError("closed")
                pending = pending[len(got):]
            echoes.append(time.time())
        except socket.timeout:
            pass
        except OSError:
            break
        time.sleep(0.05)
    print(json.dumps(echoes))


if __name__ == "__main__":
    {"tcp-server": tcp_server, "tcp-client": tcp_client,
     "udp-server": udp_server, "udp-client": udp_client,
     "echo-server": echo_server, "connect": connect,
     "stream": stream}[sys.argv[1]](*sys.argv[2:])
