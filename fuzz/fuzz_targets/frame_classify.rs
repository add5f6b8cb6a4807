//! The whole-frame classifier (Ethernet → ARP | IPv4 → ICMP | UDP → Machnet) on arbitrary
//! bytes: no panic; its fast path for Machnet frames gives what the layer-by-layer parse gives;
//! a classified Machnet frame re-emits to a frame that classifies identically; an echo request
//! yields a reply that classifies as the matching reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use machnet_net::wire::*;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else { return };
    let caps = if selector & 1 != 0 { ChecksumCaps::software() } else { ChecksumCaps::tx_only() };
    let result = classify(data, caps);
    assert_eq!(result, classify_layered(data, caps), "fast path and layered parse disagree");
    let Ok(frame) = result else { return };
    let mut out = [0u8; 4096];
    match frame {
        Frame::Machnet(m) => {
            let repr = m.repr();
            if FRAME_HEADER_LEN + m.payload.len() <= out.len() {
                let n = repr.emit_with_payload(&mut out, m.payload, ChecksumCaps::software()).unwrap();
                match classify(&out[..n], ChecksumCaps::software()).unwrap() {
                    Frame::Machnet(back) => assert_eq!(back, m),
                    other => panic!("re-emitted Machnet frame classified as {other:?}"),
                }
            }
        }
        Frame::Icmp(icmp) if icmp.echo.kind == IcmpEchoKind::Request => {
            if let Ok(n) = icmp.emit_reply(&mut out, EthernetAddress([2, 0, 0, 0, 0, 1]), ChecksumCaps::software()) {
                match classify(&out[..n], ChecksumCaps::software()).unwrap() {
                    Frame::Icmp(r) => {
                        assert_eq!(r.echo.kind, IcmpEchoKind::Reply);
                        assert_eq!(r.echo.data, icmp.echo.data);
                        assert_eq!(r.ip.dst_addr, icmp.ip.src_addr);
                    }
                    other => panic!("echo reply classified as {other:?}"),
                }
            }
        }
        Frame::Arp { arp, .. } => {
            let n = emit_arp(&mut out, arp.source_hardware_addr, EthernetAddress::BROADCAST, &arp).unwrap();
            assert!(matches!(classify(&out[..n], caps), Ok(Frame::Arp { arp: a, .. }) if a == arp));
        }
        Frame::Icmp(_) => {}
    }
});
