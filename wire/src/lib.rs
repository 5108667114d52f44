#![forbid(unsafe_code)]
//! casd's wire contract as a library of its own, so that tools, fuzz targets
//! and receiver vendors can use it without the daemon (no tokio, no
//! database, no HTTP: `tests/it/deps.rs` checks it with `cargo tree`).
//!
//! - [`crypto`] — [`crypto::Key128`], the SP 800-108 CMAC KDF, and the
//!   sealed section envelope (seal, parse, open; keys at rest). The section
//!   header and CRC are the carousel's (`carousel::section`).
//! - [`emm`] — EMM addresses, the one command type [`emm::Command`] (generic
//!   over its key payload), the plaintext, [`emm::seal_emm`] /
//!   [`emm::open_emm`] and the review rendering.
//! - [`receiver`] — a reference receiver: what a device does with the
//!   sections it filters from the air.
//! - [`personalization`] — the personalization file: DUKs wrapped for the
//!   card vendor (AES-KW, RFC 3394).

pub mod crypto;
pub mod emm;
pub mod personalization;
pub mod receiver;
