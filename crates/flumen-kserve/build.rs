//! Compiles our KServe v2 `.proto` with protox (pure Rust: no `protoc` needed),
//! only when the `grpc` feature is on.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/grpc_service.proto");
    #[cfg(feature = "grpc")]
    {
        let fds = protox::compile(["proto/grpc_service.proto"], ["proto"])?;
        tonic_prost_build::configure()
            .build_server(true)
            .build_client(true)
            .compile_fds(fds)?;
    }
    Ok(())
}
