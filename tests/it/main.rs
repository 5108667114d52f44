//! The integration tests of this crate, as one test binary (one link
//! instead of one per file). Each module is what used to be a file of
//! its own under tests/; run one with `cargo test --test it <module>::`.

mod common;
mod db_common;
mod probe_common;
mod sms_common;

mod activation_latency;
mod alerting;
mod architecture;
mod auth_api;
mod auth_log;
mod auth_tls;
mod container;
mod crash_sigkill;
mod cycler;
mod cycler_redundancy;
mod db_backup;
mod db_encryption;
mod db_failover;
mod db_tls;
mod deploy;
mod devices_import;
mod e2e_sms_to_air;
mod emmg_worker;
mod encryptor;
mod ground;
mod import_bench;
mod keys_export;
mod keystore;
mod metrics;
mod metrics_bench;
mod openapi;
mod plan;
mod probe_audit;
mod probe_headend;
mod scheduler_lease;
mod scheduler_purge;
mod scheduler_root_rotation;
mod scheduler_rotation;
mod scheduler_scale;
mod simulcrypt;
mod sms_api;
mod sms_bench;
mod sms_bulk;
mod sms_group_commit;
mod split_roles;
