//! Compiles `proto/sandboxgateway/v1/*.proto` with the vendored protoc (no system protoc) and
//! writes a file descriptor set for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // tonic-prost-build runs whatever PROTOC names; point it at the vendored binary.
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/sandboxgateway/v1/activity.proto",
        "proto/sandboxgateway/v1/wake.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("sandboxgateway_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
