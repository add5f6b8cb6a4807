#!/usr/bin/env python3
"""Independent generator of the golden frames in this directory.

Written from the byte layouts of spec §4 (Machnet header, outer headers), §4.5 (ARP) and
§4.6 (ICMP echo), sharing no code with the Rust implementation. Run it to regenerate the
.hex files; `net/tests/golden.rs` parses and re-emits every frame and compares bytes.
"""
import struct

CLIENT_MAC = bytes([0x02, 0, 0, 0, 0, 0x01])
SERVER_MAC = bytes([0x02, 0, 0, 0, 0, 0x02])
PINGER_MAC = bytes([0x02, 0, 0, 0, 0, 0x03])
CLIENT_IP = bytes([198, 18, 0, 1])
SERVER_IP = bytes([198, 18, 0, 2])
PINGER_IP = bytes([198, 18, 0, 3])
CLIENT_PORT, SERVER_PORT = 1024, 888


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def eth(dst, src, ethertype):
    return dst + src + struct.pack("!H", ethertype)


def ipv4(src, dst, proto, payload):
    # version 4, IHL 5, TOS 0, total length, ident 0x1513, flags DF, TTL 64
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1513, 0x4000, 64, proto, 0, src, dst)
    c = csum(hdr)
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + payload


def udp(src_ip, dst_ip, sport, dport, payload):
    length = 8 + len(payload)
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 17, length)
    hdr = struct.pack("!HHHH", sport, dport, length, 0)
    c = csum(pseudo + hdr + payload)
    if c == 0:
        c = 0xFFFF
    return struct.pack("!HHHH", sport, dport, length, c) + payload


def sack_words(distances):
    # bit i (distance from ackno) is bit i % 64 of word 3 - i // 64; word 0 first on the wire
    words = [0, 0, 0, 0]
    for i in distances:
        words[3 - i // 64] |= 1 << (i % 64)
    return words


def machnet(net_flags, msg_flags, seq, ack, sack=(0, 0, 0, 0), sack_count=0, ts=0):
    return struct.pack("!HBBII4QHQ", 0x4E53, net_flags, msg_flags, seq, ack, *sack, sack_count, ts)


def mn_frame(client_to_server, hdr, payload=b""):
    if client_to_server:
        smac, dmac, sip, dip, sp, dp = CLIENT_MAC, SERVER_MAC, CLIENT_IP, SERVER_IP, CLIENT_PORT, SERVER_PORT
    else:
        smac, dmac, sip, dip, sp, dp = SERVER_MAC, CLIENT_MAC, SERVER_IP, CLIENT_IP, SERVER_PORT, CLIENT_PORT
    return eth(dmac, smac, 0x0800) + ipv4(sip, dip, 17, udp(sip, dip, sp, dp, hdr + payload))


def pattern(n, start):
    return bytes((start + i) % 256 for i in range(n))


ISN_C, ISN_S = 0xFFFFFFFE, 0x9ABCDEF0  # the client ISN sits near wrap-around on purpose
DATA_TS = 0x0011223344556677
frames = {
    "syn": mn_frame(True, machnet(0x01, 0, ISN_C, 0)),
    "synack": mn_frame(False, machnet(0x03, 0, ISN_S, (ISN_C + 1) & 0xFFFFFFFF)),
    "ack_sack": mn_frame(True, machnet(0x02, 0, (ISN_C + 1) & 0xFFFFFFFF, ISN_S + 5,
                                       sack_words([1, 2, 3, 64, 255]), 5, DATA_TS)),
    "data_first": mn_frame(True, machnet(0x00, 0x03, (ISN_C + 1) & 0xFFFFFFFF, 0xFFFFFFFF, ts=DATA_TS), pattern(1418, 0)),
    "data_middle": mn_frame(True, machnet(0x00, 0x02, (ISN_C + 2) & 0xFFFFFFFF, 0xFFFFFFFF, ts=DATA_TS + 1), pattern(1418, 1418)),
    "data_last": mn_frame(True, machnet(0x00, 0x04, (ISN_C + 3) & 0xFFFFFFFF, 0xFFFFFFFF, ts=DATA_TS + 2), pattern(100, 2836)),
    "data_single": mn_frame(False, machnet(0x00, 0x05, ISN_S + 1, 0xFFFFFFFF, ts=7), b"Hello World!"),
    "rst": mn_frame(True, machnet(0x80, 0, (ISN_C + 4) & 0xFFFFFFFF, ISN_S + 2)),
    "arp_request": eth(b"\xff" * 6, CLIENT_MAC, 0x0806)
    + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, CLIENT_MAC, CLIENT_IP, b"\0" * 6, SERVER_IP),
    "arp_reply": eth(CLIENT_MAC, SERVER_MAC, 0x0806)
    + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, SERVER_MAC, SERVER_IP, CLIENT_MAC, CLIENT_IP),
}


def icmp(type_, ident, seq, data):
    hdr = struct.pack("!BBHHH", type_, 0, 0, ident, seq)
    c = csum(hdr + data)
    return struct.pack("!BBHHH", type_, 0, c, ident, seq) + data


ping_data = pattern(56, 0x10)
frames["icmp_request"] = eth(CLIENT_MAC, PINGER_MAC, 0x0800) + ipv4(PINGER_IP, CLIENT_IP, 1, icmp(8, 0x0309, 1, ping_data))
frames["icmp_reply"] = eth(PINGER_MAC, CLIENT_MAC, 0x0800) + ipv4(CLIENT_IP, PINGER_IP, 1, icmp(0, 0x0309, 1, ping_data))

for name, f in frames.items():
    with open(f"{name}.hex", "w") as out:
        h = f.hex()
        out.write("\n".join(h[i:i + 64] for i in range(0, len(h), 64)) + "\n")
    print(name, len(f))
