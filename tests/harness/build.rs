//! Compiles the test-only gRPC service (`proto/echo.proto`) with the vendored protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // tonic-prost-build runs whatever PROTOC names; point it at the vendored binary.
    std::env::set_var("PROTOC", protoc);
    let proto = "proto/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure().compile_protos(&[proto], &["proto"])?;
    Ok(())
}
