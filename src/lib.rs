#![forbid(unsafe_code)]
//! casd: the conditional-access headend daemon library.
pub mod crypto;
pub mod emm;
