//! Generates the DPDK bindings, compiles the C shim and links the system DPDK, when the
//! `bindings` feature is on. Without it the crate is an empty library, so a workspace build on a
//! machine without DPDK succeeds.
//!
//! * Flags come from `pkg-config --cflags libdpdk` and every token is passed unchanged to both
//!   bindgen and the C compiler: DPDK's headers rely on `-include rte_config.h` and
//!   `-march=corei7`, which a flag parser that only keeps `-I`/`-D` would drop.
//! * Libraries come from `pkg-config --libs libdpdk`: each `-l` becomes a dylib link directive
//!   and each `-L` a search path; the `-Wl,--as-needed` token is dropped. The shared EAL loads
//!   the poll-mode drivers from its plugin directory (`pmds-23.0`) at `rte_eal_init`, so the
//!   program links no PMD itself and nothing it needs can be dropped by the linker: rustc's own
//!   `--as-needed` only removes `rte_*` libraries the program never calls. (Stable Rust has no
//!   per-library `-as-needed` modifier; a static build with PMDs linked `+whole-archive` is
//!   the alternative, not used here, and must not be mixed with the shared EAL.)

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "bindings")]
    imp::run();
}

#[cfg(feature = "bindings")]
mod imp {
    use std::env;
    use std::path::PathBuf;
    use std::process::Command;

    const HINT: &str = "DPDK not found: the `dpdk` feature needs the system DPDK and libclang \
                        (Debian: apt-get install dpdk libdpdk-dev libclang-dev pkg-config)";

    fn pkg_config(args: &[&str]) -> Vec<String> {
        let exe = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
        let out = Command::new(&exe)
            .args(args)
            .arg("libdpdk")
            .output()
            .unwrap_or_else(|e| panic!("{HINT}; running `{exe}` failed: {e}"));
        if !out.status.success() {
            panic!("{HINT}; `{exe} {} libdpdk` said: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        String::from_utf8(out.stdout)
            .expect("pkg-config output is not UTF-8")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    pub fn run() {
        for v in ["PKG_CONFIG", "PKG_CONFIG_PATH", "PKG_CONFIG_LIBDIR", "LIBCLANG_PATH"] {
            println!("cargo:rerun-if-env-changed={v}");
        }
        println!("cargo:rerun-if-changed=csrc/shim.h");
        println!("cargo:rerun-if-changed=csrc/shim.c");

        let cflags = pkg_config(&["--cflags"]);
        let libs = pkg_config(&["--libs"]);
        let version = pkg_config(&["--modversion"]).join("");
        println!("cargo:version={version}");
        println!("cargo:cflags={}", cflags.join(" "));

        // The shim: every cflag token unchanged, in order.
        let mut build = cc::Build::new();
        build.file("csrc/shim.c").include("csrc").opt_level(2).warnings(true);
        for f in &cflags {
            build.flag(f);
        }
        build.compile("machnet_dpdk_shim");

        // Link directives; `-Wl,--as-needed` is not forwarded.
        for tok in &libs {
            if let Some(dir) = tok.strip_prefix("-L") {
                println!("cargo:rustc-link-search=native={dir}");
            } else if let Some(lib) = tok.strip_prefix("-l") {
                println!("cargo:rustc-link-lib=dylib={lib}");
            } else if tok == "-Wl,--as-needed" {
                // Dropped on purpose (see the module comment).
            } else {
                println!("cargo:warning=ignoring `pkg-config --libs libdpdk` token {tok}");
            }
        }

        let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
        bindgen::Builder::default()
            .header("csrc/shim.h")
            .clang_args(cflags.iter().map(String::as_str))
            .clang_arg("-Icsrc")
            .allowlist_function("rte_.*|machnet_.*")
            .allowlist_type("rte_.*|machnet_.*")
            .allowlist_var("RTE_.*|machnet_.*")
            // Packed structs that contain an aligned type: rustc refuses them. ARP and the other
            // headers are written in Rust (`machnet_net::wire`).
            .blocklist_type("rte_arp_ipv4")
            .blocklist_type("rte_arp_hdr")
            // A packed struct with a flexible array member cannot derive Debug.
            .no_debug("rte_flow_item_gtp_psc")
            // Flag constants are defined with function-like macros (`RTE_BIT64(n)`); let clang
            // evaluate them.
            .clang_macro_fallback()
            .derive_default(true)
            .layout_tests(true)
            .generate_comments(false)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
            .generate()
            .unwrap_or_else(|e| panic!("{HINT}; bindgen failed: {e}"))
            .write_to_file(&out)
            .expect("cannot write the bindings");
    }
}
