//! Palaver credentials: what a gateway trusts and what clients present.
//!
//! - [`auth`]: JWT verification (`Authenticator`, used by the gateway on
//!   `Hello`) and the minting primitives (`mint_hs256`, `mint_eddsa`);
//! - [`minter`]: [`minter::TokenMinter`], a signing key loaded once, the one
//!   way the CLI (`palaver token`, `palaver chat`) and the bench make tokens;
//! - [`devcerts`]: the dev CA, server certificate and HS256 secret kept in a
//!   data directory (the gateway's no-config start and `palaver certs`).
//!
//! A small crate of its own so the CLI and the bench can make tokens and dev
//! certificates without compiling the gateway (and its Kafka client).

#![forbid(unsafe_code)]

pub mod auth;
pub mod devcerts;
pub mod minter;

pub use auth::{AuthError, Authenticator, Claims};
pub use minter::TokenMinter;
