#!/usr/bin/python3
"""An attacker host on the underlay, and a listener inside the target pod.

attack.py send IFACE NODE_MAC NODE_IP PEER_IP POD_IP PEER_POD_IP VNI PORT COUNT
    From IFACE, sends COUNT of each crafted IPIP/VXLAN packet (scapy) at POD_IP behind the
    node NODE_IP (Ethernet destination NODE_MAC). PEER_IP is a real node of the cluster whose
    address the attacker spoofs; PEER_POD_IP a pod of that node. Each inner packet is UDP to
    port 7777 carrying its case name, then " CONTROL" cases that a datapath must admit (a
    spoofed outer source cannot be told apart on the wire), so the listener is shown working.
attack.py flood IFACE NODE_MAC NODE_IP POD_IP PORT COUNT
    Sends COUNT VXLAN packets from the attacker's own (unknown) address at POD_IP, as fast
    as scapy can, and prints how long it took.
attack.py listen PORT OUT SECONDS
    Writes the payload of every UDP datagram received on PORT to OUT, one per line.
"""
import socket
import sys
import time


def send(iface, node_mac, node_ip, peer_ip, pod_ip, peer_pod_ip, vni, port, count):
    from scapy.all import IP, UDP, Ether, Raw, sendp
    from scapy.layers.vxlan import VXLAN

    vni, port, count = int(vni), int(port), int(count)
    me = open(f"/sys/class/net/{iface}/address").read().strip()
    attacker_ip = None
    import subprocess

    for tok in subprocess.run(["ip", "-4", "-o", "addr", "show", iface], capture_output=True, text=True).stdout.split():
        if "/" in tok and tok[0].isdigit():
            attacker_ip = tok.split("/")[0]

    def inner(src, case):
        return IP(src=src, dst=pod_ip, ttl=64) / UDP(sport=40000, dport=7777) / Raw(case.encode())

    def vxlan(outer_src, vni_, dport, inner_pkt, outer_dst=node_ip):
        return (
            Ether(dst=node_mac, src=me)
            / IP(src=outer_src, dst=outer_dst, flags="DF")
            / UDP(sport=50000, dport=dport, chksum=0)
            / VXLAN(vni=vni_, flags=0x08)
            / Ether(dst="0e:00:00:00:00:01", src="0e:00:00:00:00:02")
            / inner_pkt
        )

    def ipip(outer_src, inner_pkt, outer_dst=node_ip):
        return Ether(dst=node_mac, src=me) / IP(src=outer_src, dst=outer_dst, proto=4) / inner_pkt

    cases = [
        ("unknown_peer", ipip(attacker_ip, inner(peer_pod_ip, "ipip-unknown-source"))),
        ("unknown_peer", vxlan(attacker_ip, vni, port, inner(peer_pod_ip, "vxlan-unknown-source"))),
        ("wrong_vni", vxlan(peer_ip, vni + 1, port, inner(peer_pod_ip, "vxlan-wrong-vni"))),
        ("inner_src_spoofed", vxlan(peer_ip, vni, port, inner("10.244.1.99", "vxlan-spoofed-inner-source"))),
        ("inner_src_spoofed", ipip(peer_ip, inner("8.8.8.8", "ipip-spoofed-inner-source"))),
        ("wrong_port", vxlan(peer_ip, vni, port + 1, inner(peer_pod_ip, "vxlan-wrong-port"))),
        ("not_for_this_node", ipip(peer_ip, inner(peer_pod_ip, "ipip-not-for-this-node"), outer_dst="192.168.1.200")),
        ("admitted", vxlan(peer_ip, vni, port, inner(peer_pod_ip, "vxlan CONTROL"))),
        ("admitted", ipip(peer_ip, inner(peer_pod_ip, "ipip CONTROL"))),
    ]
    for _ in range(count):
        for _, pkt in cases:
            sendp(pkt, iface=iface, verbose=False)
        time.sleep(0.01)
    for reason, pkt in cases:
        print(f"sent {count} {reason}: {pkt[IP].payload.summary()}")


def flood(iface, node_mac, node_ip, pod_ip, port, count):
    from scapy.all import IP, UDP, Ether, Raw, conf, sendp
    from scapy.layers.vxlan import VXLAN

    me = open(f"/sys/class/net/{iface}/address").read().strip()
    pkt = (
        Ether(dst=node_mac, src=me)
        / IP(src="192.168.1.66", dst=node_ip)
        / UDP(sport=50001, dport=int(port), chksum=0)
        / VXLAN(vni=4096, flags=0x08)
        / Ether(dst="0e:00:00:00:00:01", src="0e:00:00:00:00:02")
        / IP(src="10.244.0.2", dst=pod_ip)
        / UDP(sport=40001, dport=7777)
        / Raw(b"flood")
    )
    raw = bytes(pkt)
    start = time.time()
    s = conf.L2socket(iface=iface)
    for _ in range(int(count)):
        s.send(raw)
    s.close()
    print(f"sent {count} in {time.time() - start:.2f} s")


def listen(port, out, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(port)))
    s.settimeout(0.2)
    end = time.time() + float(seconds)
    with open(out, "w") as f:
        while time.time() < end:
            try:
                data, _ = s.recvfrom(2048)
            except socket.timeout:
                continue
            f.write(data.decode(errors="replace") + "\n")
            f.flush()


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(*sys.argv[2:11])
    elif sys.argv[1] == "flood":
        flood(*sys.argv[2:8])
    else:
        listen(*sys.argv[2:5])
