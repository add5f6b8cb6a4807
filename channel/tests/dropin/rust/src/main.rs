//! hello_bindgen: the hello_world of the original Machnet, in Rust over bindings bindgen
//! generated from machnet.h (as the original's Rust binding is made).
//!
//!   hello_bindgen --local IP [--count N]             server: answers each message, exits after N
//!   hello_bindgen --local IP --remote IP [--port P]  client: sends "Hello from bindgen!" to
//!                                                    remote:P (default 31580), waits for the answer
//!
//! Every wait is bounded (10 s); failures exit non-zero saying what failed.

#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case, dead_code)]

mod ffi {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

use std::ffi::{c_void, CStr, CString};
use std::process::exit;
use std::time::{Duration, Instant};

const PORT: u16 = 31580;
const TIMEOUT: Duration = Duration::from_secs(10);

fn fail(what: &str) -> ! {
    // SAFETY: machnet_last_error returns a static NUL-terminated string, never NULL.
    let why = unsafe { CStr::from_ptr(ffi::machnet_last_error()) };
    println!("{what} failed: {}", why.to_string_lossy());
    exit(1);
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

/// Waits (bounded) for one message; returns its bytes and flow.
fn recv(ch: *mut c_void, buf: &mut [u8]) -> Option<(usize, ffi::MachnetFlow_t)> {
    let end = Instant::now() + TIMEOUT;
    while Instant::now() < end {
        let mut flow = ffi::MachnetFlow_t { src_ip: 0, dst_ip: 0, src_port: 0, dst_port: 0 };
        // SAFETY: ch is an attached channel, buf and flow are valid for writes.
        let n = unsafe { ffi::machnet_recv(ch, buf.as_mut_ptr().cast(), buf.len(), &mut flow) };
        if n < 0 {
            fail("machnet_recv()");
        }
        if n > 0 {
            return Some((n as usize, flow));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    None
}

fn send(ch: *mut c_void, flow: ffi::MachnetFlow_t, msg: &[u8]) {
    // SAFETY: ch is an attached channel; msg is valid for reads of its length.
    if unsafe { ffi::machnet_send(ch, flow, msg.as_ptr().cast(), msg.len()) } != 0 {
        fail("machnet_send()");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let local = arg(&args, "--local").unwrap_or_else(|| {
        println!("usage: hello_bindgen --local IP [--remote IP] [--port P] [--count N]");
        exit(2)
    });
    let remote = arg(&args, "--remote");
    let port: u16 = arg(&args, "--port").map_or(PORT, |p| p.parse().expect("--port"));
    let count: u64 = arg(&args, "--count").map_or(0, |c| c.parse().expect("--count"));
    let local_c = CString::new(local.clone()).unwrap();

    // SAFETY: plain calls into the C API with valid NUL-terminated strings and pointers.
    unsafe {
        if ffi::machnet_init() != 0 {
            fail("machnet_init()");
        }
        let ch = ffi::machnet_attach();
        if ch.is_null() {
            fail("machnet_attach()");
        }
        if ffi::machnet_listen(ch, local_c.as_ptr(), PORT) != 0 {
            fail("machnet_listen()");
        }
        println!("Listening on {local}:{PORT}");
        let mut buf = vec![0u8; 1024];

        if let Some(remote) = remote {
            let remote_c = CString::new(remote.clone()).unwrap();
            let mut flow = ffi::MachnetFlow_t { src_ip: 0, dst_ip: 0, src_port: 0, dst_port: 0 };
            if ffi::machnet_connect(ch, local_c.as_ptr(), remote_c.as_ptr(), port, &mut flow) != 0 {
                fail("machnet_connect()");
            }
            println!("Connected to {remote}:{port} from port {}", flow.src_port);
            send(ch, flow, b"Hello from bindgen!");
            match recv(ch, &mut buf) {
                Some((n, _)) => println!("Reply: {}", String::from_utf8_lossy(&buf[..n])),
                None => {
                    println!("no reply within {TIMEOUT:?}");
                    exit(1);
                }
            }
        } else {
            println!("Waiting for message from client");
            let mut got = 0u64;
            while count == 0 || got < count {
                let Some((n, flow)) = recv(ch, &mut buf) else {
                    println!("no message within {TIMEOUT:?}");
                    exit(1);
                };
                got += 1;
                println!("Received message: {}, count = {got}", String::from_utf8_lossy(&buf[..n]));
                let back = ffi::MachnetFlow_t {
                    src_ip: flow.dst_ip,
                    dst_ip: flow.src_ip,
                    src_port: flow.dst_port,
                    dst_port: flow.src_port,
                };
                send(ch, back, &buf[..n]);
            }
        }
    }
}
