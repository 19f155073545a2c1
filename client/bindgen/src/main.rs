//! `uniffi-bindgen` for palaver-client: `cargo run -p palaver-client-bindgen --bin
//! uniffi-bindgen -- generate --library target/debug/libpalaver_client.so
//! --language kotlin --out-dir OUT`.
fn main() {
    uniffi::uniffi_bindgen_main()
}
