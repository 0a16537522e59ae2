//! Compiles the internal gRPC schema with protox (pure Rust), so no system `protoc` is needed,
//! and generates the tonic client and server with `tonic-prost-build`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(
        [
            "courier/internal/v1/admin.proto",
            "courier/internal/v1/chat.proto",
            "courier/internal/v1/delivery.proto",
            "courier/internal/v1/kv.proto",
            "courier/internal/v1/sequencer.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
