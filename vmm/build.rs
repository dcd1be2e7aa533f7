//! Builds the bare-metal guest images in `guest-images/` and leaves them in
//! `$OUT_DIR/images/<name>.elf`, where `src/images.rs` embeds them.
//!
//! The guests are a separate cargo workspace with its own
//! `.cargo/config.toml` (freestanding link arguments, static relocation
//! model), so this runs a nested `cargo build --release` from inside that
//! folder, into a target directory under `$OUT_DIR`, with every variable
//! through which this outer build would leak its own flags, target or
//! wrappers removed.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The image crates (binaries) of the guest workspace.
const IMAGES: &[&str] = &[
    "hello", "ticker", "kv", "compute", "bench", "netkv", "rdtsc", "tscecho",
];

/// The guest workspace's target triple (set in its .cargo/config.toml).
const GUEST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Cargo variables the nested cargo may keep: where its home and registries
/// are, how it reaches the network, how it prints.
const KEEP_PREFIXES: &[&str] = &[
    "CARGO_HOME",
    "CARGO_NET_",
    "CARGO_HTTP_",
    "CARGO_REGISTRY_",
    "CARGO_REGISTRIES_",
    "CARGO_TERM_",
];

/// Non-`CARGO_` variables that would change how the guests are compiled.
const DROP: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest_dir = manifest_dir
        .parent()
        .expect("vmm/ has a parent")
        .join("guest-images");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));

    rerun_if_guest_changes(&guest_dir);

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_dir)
        .arg("build")
        .arg("--release")
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let cargo_var =
            key.starts_with("CARGO_") && !KEEP_PREFIXES.iter().any(|p| key.starts_with(p));
        if cargo_var || DROP.contains(&key) {
            cmd.env_remove(key);
        }
    }

    // Capture the output: this script's stdout is read by cargo as
    // directives, and on failure the errors belong in the panic message.
    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "could not run {} to build the guest images: {e}",
            Path::new(&cargo).display()
        )
    });
    if !output.status.success() {
        panic!(
            "building the guest images failed ({}).\n\
             Reproduce with: cd {} && cargo build --release\n\
             --- stdout ---\n{}\n--- stderr ---\n{}",
            output.status,
            guest_dir.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }

    let built = target_dir.join(GUEST_TRIPLE).join("release");
    let images = out_dir.join("images");
    fs::create_dir_all(&images).expect("create $OUT_DIR/images");
    for name in IMAGES {
        let from = built.join(name);
        let to = images.join(format!("{name}.elf"));
        fs::copy(&from, &to).unwrap_or_else(|e| {
            panic!(
                "guest image {} was not built ({e}); is it a member of guest-images/Cargo.toml?",
                from.display()
            )
        });
    }
}

/// Asks cargo to rerun this script when any guest source changes: every
/// entry of `guest-images/` (directories are scanned recursively) except
/// its own build output.
fn rerun_if_guest_changes(guest_dir: &Path) {
    let entries = fs::read_dir(guest_dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", guest_dir.display()));
    for entry in entries {
        let entry = entry.expect("read guest-images entry");
        if entry.file_name() == "target" {
            continue;
        }
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
}
