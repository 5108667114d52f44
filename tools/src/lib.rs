#![forbid(unsafe_code)]
//! `casd-probe`: capture, decode and audit what casd puts on air.
//!
//! Reuses the carousel crate's TS/section parsers and `casd_wire::crypto` /
//! `casd_wire::emm` (never copies of them). See `docs/tools.md`.

pub mod audit;
pub mod capture;
pub mod cli;
pub mod decode;
pub mod input;
pub mod keys;
pub mod mux;
pub mod net;
pub mod record;
pub mod report;
