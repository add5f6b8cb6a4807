//! Every header parser on arbitrary bytes: no panic, and whatever parses re-emits to bytes
//! that parse to the same representation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use machnet_net::wire::*;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else { return };
    let caps = if selector & 0x80 != 0 { ChecksumCaps::software() } else { ChecksumCaps::tx_only() };
    // Large enough for any IPv4 datagram (total length is a u16).
    let mut out = vec![0u8; 65_536 + 64];
    match selector % 6 {
        0 => {
            if let Ok(f) = EthernetFrame::new_checked(data) {
                let r = EthernetRepr::parse(&f).unwrap();
                r.emit(&mut out).unwrap();
                assert_eq!(EthernetRepr::parse(&EthernetFrame::new_checked(&out[..14]).unwrap()).unwrap(), r);
            }
        }
        1 => {
            if let Ok(r) = ArpPacket::new_checked(data).and_then(|p| ArpRepr::parse(&p)) {
                r.emit(&mut out).unwrap();
                assert_eq!(ArpRepr::parse(&ArpPacket::new_checked(&out[..28]).unwrap()).unwrap(), r);
            }
        }
        2 => {
            if let Ok(p) = Ipv4Packet::new_checked(data) {
                let _ = p.payload();
                if let Ok(r) = Ipv4Repr::parse(&p, caps) {
                    let n = r.buffer_len() + r.payload_len;
                    if n <= out.len() {
                        r.emit(&mut out, ChecksumCaps::software()).unwrap();
                        let back =
                            Ipv4Repr::parse(&Ipv4Packet::new_checked(&out[..n]).unwrap(), ChecksumCaps::software());
                        assert_eq!(back.unwrap(), r);
                    }
                }
            }
        }
        3 => {
            use std::net::Ipv4Addr;
            let (s, d) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
            if let Ok(p) = UdpPacket::new_checked(data) {
                let payload = p.payload();
                if let Ok(r) = UdpRepr::parse(&p, s, d, caps) {
                    let n = 8 + payload.len();
                    out[8..n].copy_from_slice(payload);
                    r.emit(&mut out, s, d, payload.len(), ChecksumCaps::software()).unwrap();
                    let back =
                        UdpRepr::parse(&UdpPacket::new_checked(&out[..n]).unwrap(), s, d, ChecksumCaps::software());
                    assert_eq!(back.unwrap(), r);
                }
            }
        }
        4 => {
            if let Ok(p) = IcmpPacket::new_checked(data) {
                if let Ok(r) = IcmpEchoRepr::parse(&p, caps) {
                    if r.buffer_len() <= out.len() {
                        r.emit(&mut out, ChecksumCaps::software()).unwrap();
                        let n = r.buffer_len();
                        let back =
                            IcmpEchoRepr::parse(&IcmpPacket::new_checked(&out[..n]).unwrap(), ChecksumCaps::software());
                        assert_eq!(back.unwrap(), r);
                    }
                }
            }
        }
        _ => {
            if let Ok(h) = MachnetHeader::new_checked(data) {
                let _ = h.payload();
                if let Ok(r) = MachnetRepr::parse(&h) {
                    r.emit(&mut out).unwrap();
                    assert_eq!(MachnetRepr::parse(&MachnetHeader::new_checked(&out[..54]).unwrap()).unwrap(), r);
                }
            }
        }
    }
});
