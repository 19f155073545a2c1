// Compiles proto/palaver.proto with protox (pure Rust), so building needs no
// system `protoc`.
fn main() {
    let proto = "proto/palaver.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).expect("proto/palaver.proto must compile");
    prost_build::Config::new()
        .compile_fds(fds)
        .expect("prost code generation");
}
