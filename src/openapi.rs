//! The OpenAPI 3.1 document of every HTTP route (`docs/openapi.json`),
//! served at `GET /openapi.json`.
//!
//! The document is written by hand and compiled in. It is kept in step with
//! the code by the tests below (every route registered in `src/` is in it
//! and nothing else, every example request parses with the real parsers,
//! every error code the error enums produce is documented) and by
//! `tests/it/openapi.rs`, which runs schemathesis against a running headend.
//!
//! Served without a token, like `/healthz`: it describes the public contract,
//! holds no secret, and tools read it before they have a token.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// The document, as served.
pub const DOCUMENT: &str = include_str!("../docs/openapi.json");

/// `GET /openapi.json`, to merge into every process's router.
pub fn routes() -> Router {
    Router::new().route(
        "/openapi.json",
        get(|| async { ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response() }),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use serde_json::Value;

    use super::DOCUMENT;
    use crate::api_error::ApiError;
    use crate::sms::CommandKind;

    type Op = (String, String);

    fn doc() -> Value {
        serde_json::from_str(DOCUMENT).expect("docs/openapi.json is JSON")
    }

    /// `/requests/{request_id}` and axum's `/requests/{id}` alike.
    fn shape(path: &str) -> String {
        let mut out = String::new();
        let mut in_param = false;
        for c in path.chars() {
            match c {
                '{' => {
                    in_param = true;
                    out.push_str("{}");
                }
                '}' => in_param = false,
                c if !in_param => out.push(c),
                _ => {}
            }
        }
        out
    }

    /// Every (METHOD, path) of the document.
    fn documented(doc: &Value) -> BTreeSet<Op> {
        let mut ops = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                ops.insert((method.to_uppercase(), shape(path)));
            }
        }
        ops
    }

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).expect("src/ readable") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The production code of every file of src/ (test support and unit
    /// test modules left out), with its name.
    fn sources() -> Vec<(String, String)> {
        let mut files = Vec::new();
        rust_files(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        files.sort();
        files
            .into_iter()
            // metrics.rs serves `GET /metrics` on a listener of its own
            // (`[metrics] listen`, docs/metrics.md), not on the API's.
            .filter(|p| {
                p.file_name()
                    .is_none_or(|n| n != "testing.rs" && n != "metrics.rs")
            })
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("source readable");
                let code = match text.find("#[cfg(test)]\nmod tests") {
                    Some(i) => text[..i].to_owned(),
                    None => text,
                };
                (p.display().to_string(), code)
            })
            .collect()
    }

    /// Every route registered with `.route(` in src/: a literal path and a
    /// method router starting `get(` / `post(` …, or the SMS commands'
    /// `kind.path()`. Any other form fails loudly, to be taught here.
    fn registered() -> BTreeSet<Op> {
        let mut ops = BTreeSet::new();
        for (file, code) in sources() {
            for (i, _) in code.match_indices(".route(") {
                let rest = code[i + ".route(".len()..].trim_start();
                if rest.starts_with("kind.path()") {
                    for kind in CommandKind::ALL {
                        ops.insert(("POST".to_owned(), kind.path().to_owned()));
                    }
                    continue;
                }
                let path = rest
                    .strip_prefix('"')
                    .and_then(|r| r.split_once('"'))
                    .map(|(p, _)| p)
                    .unwrap_or_else(|| {
                        panic!(
                            "{file}: a route registered as `.route({}`: teach this test to read it",
                            &rest[..rest.len().min(40)]
                        )
                    });
                let after = rest[path.len() + 2..].trim_start();
                let method = after
                    .strip_prefix(',')
                    .map(str::trim_start)
                    .and_then(|m| m.split_once('('))
                    .map(|(m, _)| m)
                    .filter(|m| ["get", "post", "put", "patch", "delete"].contains(m))
                    .unwrap_or_else(|| {
                        panic!("{file}: route {path}: method router not understood")
                    });
                ops.insert((method.to_uppercase(), shape(path)));
            }
        }
        ops
    }

    #[test]
    fn every_route_is_documented_and_nothing_else() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        let registered = registered();
        let documented = documented(&doc);
        let missing: Vec<_> = registered.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&registered).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "served but not in docs/openapi.json: {missing:?}; documented but not served: {extra:?}"
        );
        // The public routes are the ones documented without security.
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let public = crate::auth::PUBLIC_PATHS.contains(&path.as_str());
                // `[]`, or `{}` among the alternatives: no token needed.
                let security = op["security"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{method} {path}: no security"));
                let open = security.is_empty()
                    || security
                        .iter()
                        .any(|r| r.as_object().is_some_and(|o| o.is_empty()));
                assert_eq!(
                    public, open,
                    "{method} {path}: public route <=> no token needed"
                );
            }
        }
    }

    /// Every `$ref` points at something.
    #[test]
    fn every_reference_resolves() {
        fn walk(doc: &Value, v: &Value, n: &mut usize) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        let ptr = r.strip_prefix('#').expect("local $ref");
                        assert!(doc.pointer(ptr).is_some(), "dangling $ref {r}");
                        *n += 1;
                    }
                    m.values().for_each(|x| walk(doc, x, n));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(doc, x, n)),
                _ => {}
            }
        }
        let doc = doc();
        let mut n = 0;
        walk(&doc, &doc, &mut n);
        assert!(n > 50);
    }

    /// Every example request body is accepted by the parser of its route.
    #[test]
    fn every_example_request_parses_with_the_real_parser() {
        use crate::encryptor::{CreateKeyRequest, KeyStateRequest, SealRequest};
        let doc = doc();
        let mut n = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let Some(content) = op["requestBody"]["content"].as_object() else {
                    continue;
                };
                for (media, m) in content {
                    let examples = m["examples"].as_object().into_iter().flatten();
                    for (name, ex) in examples {
                        let v = &ex["value"];
                        let body = serde_json::to_vec(v).unwrap();
                        let what = format!("{method} {path} example `{name}`");
                        let kind = CommandKind::ALL.into_iter().find(|k| k.path() == path);
                        match (media.as_str(), path.as_str()) {
                            ("application/json", _) if kind.is_some() => {
                                let kind = kind.unwrap();
                                crate::sms::types::parse_command(kind, &body, 256)
                                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                            }
                            ("application/json", "/encryptor/v1/seal") => {
                                serde_json::from_slice::<SealRequest>(&body)
                                    .map(drop)
                                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                            }
                            ("application/json", "/encryptor/v1/current-key") => {
                                serde_json::from_slice::<crate::keystore::KeyKind>(&body)
                                    .map(drop)
                                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                            }
                            ("application/json", "/encryptor/v1/create-key") => {
                                let r: CreateKeyRequest = serde_json::from_slice(&body)
                                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                                assert!(r.activates_at <= crate::encryptor::MAX_ACTIVATES_AT);
                            }
                            ("application/json", "/encryptor/v1/key-state") => {
                                serde_json::from_slice::<KeyStateRequest>(&body)
                                    .map(drop)
                                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                            }
                            ("application/json", "/encryptor/v1/export") => {
                                serde_json::from_slice::<crate::encryptor::ExportBody>(&body)
                                    .map(drop)
                                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                            }
                            ("application/json", "/bulk") => {
                                for item in v["commands"].as_array().expect("commands") {
                                    let mut item = item.clone();
                                    let name = item["command"].take();
                                    item.as_object_mut().unwrap().remove("command");
                                    let kind = CommandKind::ALL
                                        .into_iter()
                                        .find(|k| name == k.name())
                                        .unwrap_or_else(|| panic!("{what}: command {name}"));
                                    let b = serde_json::to_vec(&item).unwrap();
                                    crate::sms::types::parse_command(kind, &b, 256)
                                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                                }
                            }
                            ("application/json", "/jobs/{name}/run") => {
                                assert!(v.is_object(), "{what}: job parameters are an object");
                            }
                            ("application/x-www-form-urlencoded", "/oauth/token") => {
                                assert_eq!(v["grant_type"], "client_credentials", "{what}");
                            }
                            _ => {
                                panic!("{what}: no parser known for {media} here: teach this test")
                            }
                        }
                        n += 1;
                    }
                }
            }
        }
        assert!(n >= 12, "only {n} examples");
    }

    /// The error codes a response documents: `error.code` (or the OAuth
    /// `error`) narrowed by `enum` / `const`, in the schema and its
    /// `allOf` / `oneOf` / `anyOf` parts (references are not followed: each
    /// response narrows the code itself).
    fn codes(schema: &Value, out: &mut BTreeSet<String>) {
        let mut take = |v: &Value| {
            for c in v["enum"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(v.get("const"))
            {
                out.insert(c.as_str().expect("a code is a string").to_owned());
            }
        };
        let e = &schema["properties"]["error"];
        take(e);
        take(&e["properties"]["code"]);
        for k in ["allOf", "oneOf", "anyOf"] {
            for s in schema[k].as_array().into_iter().flatten() {
                codes(s, out);
            }
        }
    }

    /// (status, code) of every error response of one operation.
    fn documented_errors(doc: &Value, op: &Value) -> BTreeSet<(u16, String)> {
        let mut out = BTreeSet::new();
        for (status, resp) in op["responses"].as_object().unwrap() {
            let resp = match resp["$ref"].as_str() {
                Some(r) => doc.pointer(&r[1..]).expect("response $ref"),
                None => resp,
            };
            let mut c = BTreeSet::new();
            codes(&resp["content"]["application/json"]["schema"], &mut c);
            let status: u16 = status.parse().expect("numeric status");
            out.extend(c.into_iter().map(|c| (status, c)));
        }
        out
    }

    /// Errors of the operations whose path satisfies `pick`, together.
    fn errors_of(doc: &Value, pick: impl Fn(&str) -> bool) -> BTreeSet<(u16, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            if pick(path) {
                for op in item.as_object().unwrap().values() {
                    out.extend(documented_errors(doc, op));
                }
            }
        }
        out
    }

    fn pair(e: impl Into<ApiError>) -> (u16, String) {
        let a: ApiError = e.into();
        (a.status.as_u16(), a.code.to_owned())
    }

    /// Every SmsError, one of each variant.
    fn sms_errors() -> Vec<crate::sms::SmsError> {
        use crate::db::DbError;
        use crate::sms::SmsError::*;
        let all = vec![
            MalformedJson("x".into()),
            Missing("device_id"),
            WrongType {
                field: "device_id",
                expected: "an integer",
            },
            OutOfRange {
                field: "device_id",
                message: "x".into(),
            },
            Invalid {
                field: "text",
                message: "x".into(),
            },
            UnknownField("x".into()),
            DuplicateField("x".into()),
            InvalidTarget("x".into()),
            BadPath {
                field: "request_id",
                what: "request id",
            },
            UnknownDevice(1),
            UnknownGroup(1),
            UnknownRequest(1),
            TransactionReused,
            DeviceExists(1),
            TooLarge(1),
            UnsupportedMediaType,
            StartAfterEnd,
            OsmTooLong { len: 2, max: 1 },
            AlreadyExpired,
            Overloaded,
            Db(DbError::Unreachable("x".into())),
            Db(DbError::Migration {
                version: 1,
                name: "x",
                message: "x".into(),
            }),
            Internal("x".into()),
        ];
        // A new variant stops this from compiling until it is listed above.
        for e in &all {
            match e {
                MalformedJson(_)
                | Missing(_)
                | WrongType { .. }
                | OutOfRange { .. }
                | Invalid { .. }
                | UnknownField(_)
                | DuplicateField(_)
                | InvalidTarget(_)
                | BadPath { .. }
                | UnknownDevice(_)
                | UnknownGroup(_)
                | UnknownRequest(_)
                | TransactionReused
                | DeviceExists(_)
                | TooLarge(_)
                | UnsupportedMediaType
                | StartAfterEnd
                | OsmTooLong { .. }
                | AlreadyExpired
                | Overloaded
                | Db(_)
                | Internal(_) => {}
            }
        }
        all
    }

    fn auth_errors() -> Vec<crate::auth::AuthError> {
        use crate::auth::AuthError::*;
        let all = vec![
            Missing,
            Malformed,
            Invalid("x"),
            ClientDisabled,
            RateLimited(1),
            Unavailable,
        ];
        for e in &all {
            match e {
                Missing | Malformed | Invalid(_) | ClientDisabled | RateLimited(_)
                | Unavailable => {}
            }
        }
        all
    }

    fn encryptor_errors() -> Vec<crate::encryptor::EncryptorError> {
        use crate::encryptor::EncryptorError::*;
        let all = vec![
            Unavailable("x".into()),
            Refused("x".into()),
            NoVersion("x".into()),
            Internal("x".into()),
        ];
        for e in &all {
            match e {
                Unavailable(_) | Refused(_) | NoVersion(_) | Internal(_) => {}
            }
        }
        all
    }

    #[test]
    fn every_error_the_error_enums_produce_is_documented() {
        let doc = doc();
        let sms = errors_of(&doc, |p| {
            p.starts_with("/requests/")
                || p.starts_with("/devices/")
                || CommandKind::ALL.iter().any(|k| k.path() == p)
        });
        for e in sms_errors() {
            let what = format!("{e:?}");
            let p = pair(e);
            assert!(
                sms.contains(&p),
                "SmsError {what} -> {p:?} is not documented"
            );
        }
        let enc = errors_of(&doc, |p| p.starts_with("/encryptor/"));
        for e in encryptor_errors() {
            let what = format!("{e:?}");
            let p = pair(e);
            assert!(
                enc.contains(&p),
                "EncryptorError {what} -> {p:?} is not documented"
            );
        }
        // Every operation that needs a token documents every refusal of it.
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if crate::auth::PUBLIC_PATHS.contains(&path.as_str()) {
                    continue;
                }
                let documented = documented_errors(&doc, op);
                for e in auth_errors() {
                    let p = pair(e.clone());
                    assert!(
                        documented.contains(&p),
                        "{method} {path}: {e:?} -> {p:?} is not documented"
                    );
                }
                assert!(
                    documented.contains(&(403, "insufficient_scope".into())),
                    "{method} {path}: 403"
                );
            }
        }
    }

    fn status_of(name: &str) -> u16 {
        match name {
            "BAD_REQUEST" => 400,
            "UNAUTHORIZED" => 401,
            "FORBIDDEN" => 403,
            "NOT_FOUND" => 404,
            "METHOD_NOT_ALLOWED" => 405,
            "CONFLICT" => 409,
            "PAYLOAD_TOO_LARGE" => 413,
            "UNSUPPORTED_MEDIA_TYPE" => 415,
            "UNPROCESSABLE_ENTITY" => 422,
            "TOO_MANY_REQUESTS" => 429,
            "INTERNAL_SERVER_ERROR" => 500,
            "SERVICE_UNAVAILABLE" => 503,
            other => panic!("StatusCode::{other}: add it to this table"),
        }
    }

    /// Error codes written as literals anywhere in src/ (`ApiError::new(
    /// StatusCode::X, "code"`, `oauth_err("code"`), beyond the enums above.
    #[test]
    fn every_literal_error_code_in_the_code_is_documented() {
        let doc = doc();
        let everywhere = errors_of(&doc, |_| true);
        let token = errors_of(&doc, |p| p == "/oauth/token");
        let mut n = 0;
        for (file, code) in sources() {
            for (i, _) in code.match_indices("ApiError::new(") {
                let rest = code[i + "ApiError::new(".len()..].trim_start();
                // `ApiError::new(status, code, …)` with variables: the
                // enum conversions, checked above.
                let Some(rest) = rest.strip_prefix("StatusCode::") else {
                    continue;
                };
                let (status, rest) = rest.split_once(',').expect("status, code");
                let c = rest
                    .trim_start()
                    .strip_prefix('"')
                    .and_then(|r| r.split_once('"'));
                let Some((c, _)) = c else {
                    panic!("{file}: ApiError::new(StatusCode::{status}, <not a literal>): teach this test");
                };
                let p = (status_of(status.trim()), c.to_owned());
                // 405 answers a method a path does not document; the
                // document's description says so.
                if p.0 == 405 {
                    assert!(doc["info"]["description"].as_str().unwrap().contains(c));
                } else {
                    assert!(everywhere.contains(&p), "{file}: {p:?} is not documented");
                }
                n += 1;
            }
            for (i, _) in code.match_indices("oauth_err(") {
                let rest = code[i + "oauth_err(".len()..].trim_start();
                if let Some((c, _)) = rest.strip_prefix('"').and_then(|r| r.split_once('"')) {
                    assert!(
                        token.iter().any(|(_, d)| d == c),
                        "{file}: OAuth error `{c}` is not documented on /oauth/token"
                    );
                    n += 1;
                }
            }
        }
        assert!(n >= 15, "only {n} literal codes found");
    }
}
