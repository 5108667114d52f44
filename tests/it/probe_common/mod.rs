//! Shared by the casd-probe tests that need a running headend. They live in
//! the casd crate because casd-tools does not depend on the daemon: the
//! probe's own test helpers (streams, running the binary) are casd-tools'
//! file, included here, and [`headend`] is a real headend on a TestDb.
#![allow(dead_code)]

#[path = "../../../tools/tests/it/common/mod.rs"]
mod tools_common;
pub use tools_common::*;

pub mod headend;
