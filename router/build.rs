// Compiles proto/palaver_internal.proto (the router's Kafka / pub-sub record
// schema) with protox; it imports the client schema from the protocol crate,
// whose generated types are reused (extern_path) rather than generated twice.
fn main() {
    let proto = "proto/palaver_internal.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=../protocol/proto/palaver.proto");
    let fds = protox::compile([proto], ["proto", "../protocol/proto"])
        .expect("proto/palaver_internal.proto must compile");
    prost_build::Config::new()
        .extern_path(".palaver.v1", "::palaver_protocol::pb")
        .compile_fds(fds)
        .expect("prost code generation");
}
