//! Generates the bindings from machnet.h as the original Machnet's Rust binding does
//! (`allowlist_function(".*machnet.*")`) and links `machnet_shim`.
//!
//! * `MACHNET_INCLUDE_DIR`: where machnet.h is (default: `channel/include` of this repository).
//! * `MACHNET_LIB_DIR`: where libmachnet_shim.so is (default: `target/release` of this repository).

use std::env;
use std::path::PathBuf;

fn main() {
    let here = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let repo = here.join("../../../..");
    let include = env::var_os("MACHNET_INCLUDE_DIR").map(PathBuf::from).unwrap_or_else(|| repo.join("channel/include"));
    let lib = env::var_os("MACHNET_LIB_DIR").map(PathBuf::from).unwrap_or_else(|| repo.join("target/release"));
    println!("cargo:rerun-if-env-changed=MACHNET_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=MACHNET_LIB_DIR");
    println!("cargo:rerun-if-changed={}", include.join("machnet.h").display());
    println!("cargo:rerun-if-changed={}", include.join("machnet_common.h").display());

    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=machnet_shim");

    let bindings = bindgen::Builder::default()
        .header(include.join("machnet.h").to_str().unwrap())
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function(".*machnet.*")
        .generate()
        .expect("bindgen could not generate the bindings from machnet.h");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings.write_to_file(&out).expect("write bindings.rs");
}
