// Compiles proto/palaver.proto with protox (pure Rust), so building needs no
// system `protoc`. Also writes the encoded FileDescriptorSet next to the
// generated code (exposed as `palaver_protocol::FILE_DESCRIPTOR_SET`, used for
// proto3-JSON rendering in tools and the test vectors).
fn main() {
    let proto = "proto/palaver.proto";
    println!("cargo:rerun-if-changed={proto}");
    let mut compiler = protox::Compiler::new(["proto"]).expect("include path");
    compiler
        .include_imports(true)
        .open_file(proto)
        .expect("proto/palaver.proto must compile");
    let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(
        out_dir.join("palaver.fds"),
        compiler.encode_file_descriptor_set(),
    )
    .expect("write descriptor set");
    prost_build::Config::new()
        .compile_fds(compiler.file_descriptor_set())
        .expect("prost code generation");
}
