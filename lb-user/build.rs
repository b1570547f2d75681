use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;
use sha2::Digest as _;

/// Builds `lb-ebpf` for the BPF target with the nightly toolchain and
/// bpf-linker (both installed by `cargo xtask setup`), and gives the crate
/// the object's SHA-256 as `LB_EBPF_SHA256` (hex).
fn main() -> anyhow::Result<()> {
    build()?;
    let object = std::path::Path::new(&std::env::var("OUT_DIR").context("OUT_DIR not set")?).join("lb");
    let hash = match std::fs::read(&object) {
        Ok(bytes) => sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect::<String>(),
        // AYA_BUILD_SKIP: no object was built.
        Err(_) => "none".to_owned(),
    };
    println!("cargo:rustc-env=LB_EBPF_SHA256={hash}");
    Ok(())
}

fn build() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found in the workspace"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() };
    aya_build::build_ebpf([package], Toolchain::default())
        .context("building the eBPF object failed; run `cargo xtask setup` (nightly rust-src, bpf-linker)")
}
