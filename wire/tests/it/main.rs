//! The integration tests of this crate, as one test binary (one link
//! instead of one per file). Each module is what used to be a file of
//! its own under tests/; run one with `cargo test --test it <module>::`.

mod crypto_kat;
mod crypto_props;
mod crypto_vectors;
mod deps;
mod personalization_vectors;
