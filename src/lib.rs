#![forbid(unsafe_code)]
//! casd: the conditional-access headend daemon library. See ARCHITECTURE.md
//! for the map; each module's doc says what it does and does not know.

pub mod api_error;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod cycler;
pub mod db;
pub mod emm_store;
pub mod emmg;
pub mod encryptor;
pub mod export;
pub mod failpoint;
pub mod http;
pub mod import;
pub mod jsonlog;
pub mod keystore;
pub mod lease;
pub mod metrics;
pub mod onair;
pub mod openapi;
pub mod plan;
pub mod queue;
pub mod reqlog;
pub mod scheduler;
pub mod shutdown;
pub mod simulcrypt;
pub mod sms;
pub mod sqltext;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
