#!/usr/bin/python3
"""Checks an underlay capture with scapy, a dissector this project did not write.

Usage: wire_check.py MODE POD_PCAP UNDERLAY_PCAP [VNI PORT [udpcsum]]
       wire_check.py segments - UNDERLAY_PCAP VNI PORT MTU


Every frame on the underlay must be IPIP (MODE=ipip) or VXLAN (MODE=vxlan) with valid outer
checksums (the outer UDP one zero, or valid with "udpcsum"), exactly 20 or 50 bytes of overhead, the configured VNI and port, and an inner IPv4
packet byte-identical to one the pod sent, apart from the TTL (and so the header checksum).
Prints one summary line; exits 1 with the first mismatch.

"segments" checks a capture of GSO traffic segmented in software on the way out (transmit
checksum offload off, so every checksum is complete on the wire): every frame VXLAN with the
VNI and port, no larger than MTU, its outer UDP checksum non-zero and equal to scapy's, and
frames of full size among them (the GSO path was taken).
"""
import sys

from scapy.all import IP, TCP, UDP, Ether, bind_layers, raw, rdpcap
from scapy.layers.vxlan import VXLAN


def fail(msg):
    print(f"wire check FAILED: {msg}")
    sys.exit(1)


def normalized(ip_bytes):
    """Inner IPv4 bytes with TTL and header checksum zeroed."""
    b = bytearray(ip_bytes)
    b[8] = 0
    b[10:12] = b"\0\0"
    return bytes(b)


def checksum_ok(ip):
    want = ip.chksum
    again = IP(raw(ip))
    del again.chksum
    return IP(raw(again)).chksum == want


def segments(ul_pcap, vni, port, mtu):
    bind_layers(UDP, VXLAN, dport=port)
    frames = rdpcap(ul_pcap)
    full = 0
    for n, f in enumerate(frames, 1):
        if IP not in f or VXLAN not in f:
            fail(f"frame {n}: not VXLAN: {f.summary()}")
        outer = f[IP]
        if outer.len > mtu:
            fail(f"frame {n}: {outer.len} bytes on a {mtu}-byte link: not segmented")
        if f[VXLAN].vni != vni or f[UDP].dport != port:
            fail(f"frame {n}: vni {f[VXLAN].vni} port {f[UDP].dport}")
        got = f[UDP].chksum
        again = IP(raw(outer))
        del again[UDP].chksum
        want = IP(raw(again))[UDP].chksum
        if got == 0 or got != want:
            fail(f"frame {n} ({outer.len} bytes): outer UDP checksum {got:#x}, scapy computes {want:#x}")
        full += outer.len == mtu
    if full < 100:
        fail(f"only {full} full-size segments among {len(frames)} frames: GSO path not exercised")
    print(f"wire check ok: {len(frames)} segmented vxlan frames ({full} of full size), every outer UDP checksum valid")


def main():
    if sys.argv[1] == "segments":
        segments(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        return
    mode, pod_pcap, ul_pcap = sys.argv[1:4]
    vni = int(sys.argv[4]) if len(sys.argv) > 4 else None
    port = int(sys.argv[5]) if len(sys.argv) > 5 else None
    udp_csum = len(sys.argv) > 6 and sys.argv[6] == "udpcsum"
    if port is not None:
        bind_layers(UDP, VXLAN, dport=port)

    sent = {}
    for p in rdpcap(pod_pcap):
        if IP in p:
            ip = p[IP]
            sent[normalized(raw(ip)[: ip.len])] = True

    frames = rdpcap(ul_pcap)
    if not frames:
        fail("no frames captured on the underlay")
    matched = 0
    for n, f in enumerate(frames, 1):
        if Ether not in f or IP not in f:
            fail(f"frame {n}: not Ethernet/IPv4: {f.summary()}")
        outer = f[IP]
        if not checksum_ok(outer):
            fail(f"frame {n}: bad outer IPv4 checksum {outer.chksum:#06x}")
        if mode == "ipip":
            if outer.proto != 4:
                fail(f"frame {n}: outer protocol {outer.proto}, expected 4 (IPIP)")
            inner = outer.payload
            if not isinstance(inner, IP):
                fail(f"frame {n}: IPIP payload is not IPv4")
            overhead = outer.len - inner.len
            want_overhead = 20
        else:
            if UDP not in outer or VXLAN not in outer:
                fail(f"frame {n}: not VXLAN: {f.summary()}")
            udp = outer[UDP]
            if port is not None and udp.dport != port:
                fail(f"frame {n}: UDP port {udp.dport}, expected {port}")
            vx = outer[VXLAN]
            if vni is not None and vx.vni != vni:
                fail(f"frame {n}: vni mismatch: got {vx.vni}, expected {vni}")
            if vx.flags != 0x08:
                fail(f"frame {n}: VXLAN flags {vx.flags:#x}, expected 0x08")
            if udp_csum:
                # Over veth an inner checksum left to offload (CHECKSUM_PARTIAL) is never
                # filled in; a NIC would fill it. Check the outer checksum of the completed packet.
                again = IP(raw(outer))
                inner_ip = again[VXLAN][Ether][IP]
                for l4 in (UDP, TCP):
                    if l4 in inner_ip:
                        del inner_ip[l4].chksum
                del again[UDP].chksum
                want = IP(raw(again))[UDP].chksum
                if udp.chksum != want:
                    fail(f"frame {n}: outer UDP checksum {udp.chksum:#x}, scapy computes {want:#x}")
            elif udp.chksum not in (0, None):
                fail(f"frame {n}: outer UDP checksum {udp.chksum:#x}, expected 0")
            if udp.len != outer.len - 20:
                fail(f"frame {n}: UDP length {udp.len} for IP length {outer.len}")
            if not (32768 <= udp.sport < 61000):
                fail(f"frame {n}: UDP source port {udp.sport} outside 32768-60999")
            inner_eth = vx.payload
            if not isinstance(inner_eth, Ether) or IP not in inner_eth:
                fail(f"frame {n}: VXLAN payload is not Ethernet/IPv4")
            inner = inner_eth[IP]
            overhead = outer.len - inner.len
            want_overhead = 50
        if overhead != want_overhead:
            fail(f"frame {n}: {overhead} bytes of overhead, expected {want_overhead}")
        if not checksum_ok(inner):
            fail(f"frame {n}: bad inner IPv4 checksum")
        key = normalized(raw(inner)[: inner.len])
        if key not in sent:
            fail(f"frame {n}: inner packet {inner.summary()} differs from what the pod sent")
        matched += key in sent
    print(f"wire check ok: {len(frames)} {mode} frames, {matched} matched byte-for-byte to the pod's packets")


if __name__ == "__main__":
    main()
