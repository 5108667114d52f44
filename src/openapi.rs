//! The OpenAPI 3.1 document of every HTTP route (`docs/openapi.json`),
//! served at `GET /openapi.json`.
//!
//! The document is written by hand and compiled in. It is kept in step with
//! the code by the tests below (every route registered in `src/` is in it
//! and nothing else, every example request parses with the real parsers,
//! every error code the error enums produce is documented) and by
//! `tests/openapi.rs`, which runs schemathesis against a running headend.
//!
//! Served without a token, like `/healthz`: it describes the public contract,
//! holds no secret, and tools read it before they have a token.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// The document, as served.
pub const DOCUMENT: &str = include_str!("../docs/openapi.json");

/// Where the document is served.
pub const PATH: &str = "/openapi.json";

/// `GET /openapi.json`, to merge into every process's router.
pub fn routes() -> Router {
    Router::new().route(
        PATH,
        get(|| async { ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response() }),
    )
}
