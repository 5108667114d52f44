#![forbid(unsafe_code)]
//! casd: the conditional-access headend daemon library. See ARCHITECTURE.md
//! for the map; each module's doc says what it does and does not know.

pub mod api_error;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod http;
pub mod shutdown;
pub mod testing;
pub mod tls;
