//! The SMS-CAS interface over real HTTP against a throwaway MariaDB:
//! every command, every error status of sms-api.md with its body,
//! idempotency, concurrency, slot allocation, records.

use crate::sms_common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use serde_json::{json, Value};
use sms_common::Headend;

fn assert_error(status: u16, v: &Value, want_status: u16, code: &str, field: Option<&str>) {
    assert_eq!(status, want_status, "{v}");
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    match field {
        Some(f) => assert_eq!(e["field"], f, "{v}"),
        None => assert!(e.get("field").is_none(), "{v}"),
    }
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["error"], "{v}");
}

#[tokio::test]
async fn every_command_happy_path_and_read_routes() {
    let h = Headend::start().await;

    // adddevice
    let (s, v, hdr) = h
        .post(
            "/adddevice",
            r#"{"transaction_id":"t-add","device_id":1001}"#,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let add_id = v["request_id"].as_u64().unwrap();
    assert_eq!(
        v,
        json!({"request_id": add_id, "transaction_id": "t-add", "status": "accepted"})
    );
    assert_eq!(hdr["x-request-id"], add_id.to_string().as_str());
    assert_eq!(hdr["content-type"], "application/json");

    // addentitlement, RFC 3339 and unix seconds
    h.ok(
        "/addentitlement",
        r#"{"transaction_id":"t-e1","device_id":1001,"product_id":7,"start":"2024-01-01T00:00:00Z","end":1893456000}"#,
    )
    .await;
    h.ok(
        "/addentitlement",
        r#"{"transaction_id":"t-e2","device_id":1001,"product_id":8,"start":1704067200,"end":"2030-01-01T00:00:00+00:00"}"#,
    )
    .await;
    h.ok(
        "/removeentitlement",
        r#"{"transaction_id":"t-r1","device_id":1001,"product_id":8}"#,
    )
    .await;
    // OSM to the device, its group, everyone.
    h.ok(
        "/generateosm",
        r#"{"transaction_id":"t-o1","device_id":1001,"text":"Hello","duration_s":30}"#,
    )
    .await;
    h.ok(
        "/generateosm",
        r#"{"transaction_id":"t-o2","group_id":1,"text":"Group","duration_s":0,"forced":true,"expires_at":4000000000}"#,
    )
    .await;
    h.ok(
        "/generateosm",
        r#"{"transaction_id":"t-o3","all":true,"text":"Everyone","duration_s":5}"#,
    )
    .await;

    // GET /devices/{id}
    let (s, d) = h.get("/devices/1001").await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["device_id"], 1001);
    assert_eq!(d["state"], "enabled");
    assert_eq!(d["group_id"], 1);
    assert_eq!(d["slot"], 0);
    assert_eq!(d["pmk_version"], 1);
    let ents = d["entitlements"].as_array().unwrap();
    assert_eq!(ents.len(), 2);
    assert_eq!(ents[0]["product_id"], 7);
    assert_eq!(ents[0]["start"], 1704067200);
    assert_eq!(ents[0]["end"], 1893456000);
    assert_eq!(ents[0]["state"], "active");
    assert_eq!(ents[1]["product_id"], 8);
    assert_eq!(ents[1]["state"], "ended");

    // GET /requests/{id}: accepted, no EMMs yet; then with one EMM made for it.
    let (s, r) = h.get(&format!("/requests/{add_id}")).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["status"], "accepted");
    assert_eq!(r["transaction_id"], "t-add");
    assert_eq!(r["path"], "/adddevice");
    assert_eq!(r["processed_at"], Value::Null);
    assert_eq!(r["emm_ids"], json!([]));
    {
        let mut c = h.db().conn().await.unwrap();
        c.exec_drop(
            "INSERT INTO emms (id, request_id, addressing, address, key_version, class, purpose, emm_data, encrypted_emm, created_at, not_after, state) \
             VALUES (77, ?, 'unique', 1001, 1, 0, 'enable', '[]', x'00', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 'live')",
            (add_id,),
        )
        .await
        .unwrap();
        c.exec_drop(
            "UPDATE sms_requests SET processed_at = UTC_TIMESTAMP(6) WHERE id = ?",
            (add_id,),
        )
        .await
        .unwrap();
    }
    let (_, r) = h.get(&format!("/requests/{add_id}")).await;
    assert_eq!(r["status"], "processed");
    assert_eq!(r["emm_ids"], json!([77]));
    assert!(r["processed_at"].as_str().unwrap().ends_with('Z'));
    // Another sender does not see it.
    let resp = h
        .client
        .get(h.url(&format!("/requests/{add_id}")))
        .header("authorization", h.bearer("other").await)
        .send()
        .await
        .unwrap();
    // The test clients have every scope; `admin` sees every sender's requests.
    assert_eq!(resp.status(), 200);

    // removedevice: disabled, slot freed, entitlements ended.
    h.ok(
        "/removedevice",
        r#"{"transaction_id":"t-rm","device_id":1001}"#,
    )
    .await;
    let (_, d) = h.get("/devices/1001").await;
    assert_eq!(d["state"], "disabled");
    assert_eq!(d["group_id"], Value::Null);
    assert_eq!(d["slot"], Value::Null);
    assert!(d["entitlements"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["state"] == "ended"));

    // One work item per accepted command, in order, with its kind.
    let mut c = h.db().conn().await.unwrap();
    let items: Vec<(String, Option<u64>, String)> = c
        .query("SELECT kind, device_id, payload FROM work_items ORDER BY id")
        .await
        .unwrap();
    let kinds: Vec<&str> = items.iter().map(|i| i.0.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "adddevice",
            "addentitlement",
            "addentitlement",
            "removeentitlement",
            "generateosm",
            "generateosm",
            "generateosm",
            "removedevice"
        ]
    );
    assert_eq!(
        items[4].1,
        Some(1001),
        "unique OSM is ordered with its device"
    );
    assert_eq!(items[5].1, None);
    let osm: Value = serde_json::from_str(&items[5].2).unwrap();
    assert_eq!(osm["not_after"], 4000000000u32);
    assert_eq!(osm["forced"], true);
    assert_eq!(osm["target"], json!({"group": 1}));
    let global: Value = serde_json::from_str(&items[6].2).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let na = global["not_after"].as_i64().unwrap();
    assert!(
        (now + 86400 - 5..=now + 86400 + 5).contains(&na),
        "default OSM lifetime 24 h"
    );

    // Every request is a row with its reply; and a log line.
    let rows: Vec<(u64, String, u16, String)> = c
        .query("SELECT id, sender, status_code, response FROM sms_requests ORDER BY id")
        .await
        .unwrap();
    assert_eq!(rows.len(), 8);
    assert!(rows.iter().all(|r| r.1 == "sms1" && r.2 == 200));
    let first: Value = serde_json::from_str(&rows[0].3).unwrap();
    assert_eq!(first["request_id"], add_id);
    let lines = h.log_lines().await;
    let posts: Vec<&Value> = lines.iter().filter(|l| l["method"] == "POST").collect();
    assert_eq!(posts.len(), 8);
    assert_eq!(posts[0]["id"], add_id);
    assert_eq!(posts[0]["sender"], "sms1");
    assert_eq!(posts[0]["status"], 200);
    let all = std::fs::read_to_string(&h.log_path).unwrap();
    assert!(
        !all.to_lowercase().contains("bearer"),
        "no token in the log"
    );
}

#[tokio::test]
async fn every_error_status_has_the_spec_body() {
    let h = Headend::start().await;
    h.add_device(5).await;

    // 400s
    let (s, v, _) = h.post("/adddevice", "{not json").await;
    assert_error(s, &v, 400, "malformed_json", None);
    let (s, v, _) = h
        .post("/adddevice", r#"{"transaction_id":"x","device_id":"5"}"#)
        .await;
    assert_error(s, &v, 400, "wrong_type", Some("device_id"));
    let (s, v, _) = h
        .post(
            "/adddevice",
            r#"{"transaction_id":"x","device_id":9007199254740992}"#,
        )
        .await;
    assert_error(s, &v, 400, "out_of_range", Some("device_id"));
    let (s, v, _) = h.post("/adddevice", r#"{"transaction_id":"x"}"#).await;
    assert_error(s, &v, 400, "missing_field", Some("device_id"));
    let (s, v, _) = h
        .post(
            "/generateosm",
            r#"{"transaction_id":"x","device_id":5,"group_id":1,"text":"a","duration_s":1}"#,
        )
        .await;
    assert_error(s, &v, 400, "invalid_target", None);

    // 401: no token, bad token.
    let r = h
        .client
        .post(h.url("/adddevice"))
        .header("content-type", "application/json")
        .body(r#"{"transaction_id":"x","device_id":6}"#)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 401, "unauthorized", None);
    let r = h
        .client
        .post(h.url("/adddevice"))
        .header("authorization", "Bearer nonsense")
        .header("content-type", "application/json")
        .body(r#"{"transaction_id":"x","device_id":6}"#)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 401, "unauthorized", None);

    // 404 unknown device, for each command that needs one.
    for (path, body) in [
        ("/removedevice", r#"{"transaction_id":"x","device_id":6}"#),
        (
            "/addentitlement",
            r#"{"transaction_id":"x","device_id":6,"product_id":1,"start":0,"end":1}"#,
        ),
        (
            "/removeentitlement",
            r#"{"transaction_id":"x","device_id":6,"product_id":1}"#,
        ),
        (
            "/generateosm",
            r#"{"transaction_id":"x","device_id":6,"text":"a","duration_s":1}"#,
        ),
    ] {
        let (s, v, _) = h.post(path, body).await;
        assert_error(s, &v, 404, "unknown_device", Some("device_id"));
    }
    let (s, v, _) = h
        .post(
            "/generateosm",
            r#"{"transaction_id":"x","group_id":99,"text":"a","duration_s":1}"#,
        )
        .await;
    assert_error(s, &v, 404, "unknown_group", Some("group_id"));
    let (s, v) = h.get("/devices/6").await;
    assert_error(s, &v, 404, "unknown_device", Some("device_id"));
    let (s, v) = h.get("/devices/abc").await;
    assert_error(s, &v, 400, "out_of_range", Some("device_id"));
    let (s, v) = h.get("/requests/999999").await;
    assert_error(s, &v, 404, "unknown_request", None);

    // 409 device exists; 409 transaction reuse.
    let (s, v, _) = h
        .post("/adddevice", r#"{"transaction_id":"other","device_id":5}"#)
        .await;
    assert_error(s, &v, 409, "device_exists", Some("device_id"));
    let (s, v, _) = h
        .post("/adddevice", r#"{"transaction_id":"add-5","device_id":7}"#)
        .await;
    assert_error(s, &v, 409, "transaction_reused", Some("transaction_id"));

    // 413: over the limit, declared or streamed (chunked, no Content-Length).
    let big = format!(
        r#"{{"transaction_id":"x","device_id":6,"pad":"{}"}}"#,
        "a".repeat(70 * 1024)
    );
    let (s, v, _) = h.post("/adddevice", &big).await;
    assert_error(s, &v, 413, "body_too_large", None);
    let (s, v) = chunked_post(&h, "/adddevice", 70, 1024).await;
    assert_error(s, &v, 413, "body_too_large", None);

    // 415: no or another content type.
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut rb = h
            .client
            .post(h.url("/adddevice"))
            .header("authorization", h.bearer("sms1").await)
            .body(r#"{"transaction_id":"x","device_id":6}"#);
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        let r = rb.send().await.unwrap();
        let s = r.status().as_u16();
        assert_error(
            s,
            &r.json().await.unwrap(),
            415,
            "unsupported_media_type",
            None,
        );
    }
    // A charset parameter is fine.
    let r = h
        .client
        .post(h.url("/adddevice"))
        .header("authorization", h.bearer("sms1").await)
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(r#"{"transaction_id":"ct","device_id":8}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // 422: start after end, OSM too long for one EMM, already expired.
    let (s, v, _) = h
        .post(
            "/addentitlement",
            r#"{"transaction_id":"x","device_id":5,"product_id":1,"start":"2030-01-01T00:00:00Z","end":"2029-01-01T00:00:00Z"}"#,
        )
        .await;
    assert_error(s, &v, 422, "start_after_end", Some("start"));
    let long = format!(
        r#"{{"transaction_id":"x","device_id":5,"text":"{}","duration_s":1}}"#,
        "a".repeat(162)
    );
    let (s, v, _) = h.post("/generateosm", &long).await;
    assert_error(s, &v, 422, "osm_too_long", Some("text"));
    let (s, v, _) = h
        .post(
            "/generateosm",
            r#"{"transaction_id":"x","all":true,"text":"a","duration_s":1,"expires_at":1000}"#,
        )
        .await;
    assert_error(s, &v, 422, "already_expired", Some("expires_at"));

    // 405 on a command path.
    let r = h.client.get(h.url("/adddevice")).send().await.unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 405, "method_not_allowed", None);

    // Every refused authenticated request is a row with its status and reply.
    let mut c = h.db().conn().await.unwrap();
    let rows: Vec<(u16, String, Option<String>)> = c
        .query("SELECT status_code, response, transaction_id FROM sms_requests WHERE status_code <> 200 ORDER BY id")
        .await
        .unwrap();
    let statuses: Vec<u16> = rows.iter().map(|r| r.0).collect();
    assert_eq!(
        statuses,
        [
            400, 400, 400, 400, 400, 404, 404, 404, 404, 404, 409, 409, 413, 413, 415, 415, 415,
            422, 422, 422
        ]
    );
    let first: Value = serde_json::from_str(&rows[0].1).unwrap();
    assert_eq!(first["error"]["code"], "malformed_json");
    assert_eq!(
        rows[1].2.as_deref(),
        Some("x"),
        "transaction_id kept when readable"
    );
    // 401s are only in the request log.
    let lines = h.log_lines().await;
    assert_eq!(lines.iter().filter(|l| l["status"] == 401).count(), 2);
    assert!(lines
        .iter()
        .filter(|l| l["status"] == 401)
        .all(|l| l["sender"].is_null()));
}

/// POSTs `n` chunks of `size` spaces with Transfer-Encoding: chunked (no
/// Content-Length) over a raw connection; returns status and JSON body.
async fn chunked_post(h: &Headend, path: &str, n: usize, size: usize) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let bearer = h.bearer("sms1").await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: {bearer}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{size:x}\r\n{}\r\n", " ".repeat(size));
    for _ in 0..n {
        // The server may answer and close before everything is sent.
        if sock.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = sock.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text[9..12].parse().unwrap();
    let body_at = text.find("\r\n\r\n").unwrap() + 4;
    let v = serde_json::from_str(&text[body_at..]).unwrap_or(Value::String(text.clone()));
    (status, v)
}

#[tokio::test]
async fn refused_commands_change_nothing_but_their_record() {
    let h = Headend::start().await;
    h.add_device(1).await;
    h.ok(
        "/addentitlement",
        r#"{"transaction_id":"e","device_id":1,"product_id":3,"start":0,"end":10}"#,
    )
    .await;
    let refusals = [
        ("/adddevice", r#"{"transaction_id":"r1","device_id":1}"#),
        ("/removedevice", r#"{"transaction_id":"r2","device_id":2}"#),
        (
            "/addentitlement",
            r#"{"transaction_id":"r3","device_id":2,"product_id":3,"start":0,"end":10}"#,
        ),
        (
            "/addentitlement",
            r#"{"transaction_id":"r4","device_id":1,"product_id":3,"start":11,"end":10}"#,
        ),
        (
            "/generateosm",
            r#"{"transaction_id":"r5","all":true,"text":"x","duration_s":1,"expires_at":5}"#,
        ),
        ("/adddevice", r#"{"transaction_id":"add-1","device_id":9}"#),
        ("/adddevice", r#"{"transaction_id":"r6","device_id":0}"#),
    ];
    for (path, body) in refusals {
        let before = h.counts().await;
        let (s, v, _) = h.post(path, body).await;
        assert!(s >= 400, "{path} {body} -> {s} {v}");
        let after = h.counts().await;
        for ((t, b), (_, a)) in before.iter().zip(after.iter()) {
            let want = if *t == "sms_requests" { b + 1 } else { *b };
            assert_eq!(*a, want, "{t} after {path} {body}");
        }
    }
    // A refused request's transaction_id stays free.
    h.ok("/adddevice", r#"{"transaction_id":"r1","device_id":2}"#)
        .await;
}

#[tokio::test]
async fn idempotency_same_body_replays_different_body_conflicts() {
    let h = Headend::start().await;
    let body = r#"{"transaction_id":"T1","device_id":42}"#;
    let (s1, v1, _) = h.post("/adddevice", body).await;
    assert_eq!(s1, 200);
    // Same command, other spelling (field order, whitespace): same reply.
    let (s2, v2, hdr) = h
        .post(
            "/adddevice",
            "{ \"device_id\" : 42, \"transaction_id\" : \"T1\" }",
        )
        .await;
    assert_eq!((s2, &v2), (200, &v1));
    // The replay is recorded as its own row pointing at the original.
    let replay_row: u64 = hdr["x-request-id"].to_str().unwrap().parse().unwrap();
    assert_ne!(replay_row, v1["request_id"].as_u64().unwrap());
    let (_, r) = h.get(&format!("/requests/{replay_row}")).await;
    assert_eq!(r["status"], "replayed");
    assert_eq!(r["original_request_id"], v1["request_id"]);
    assert_eq!(h.count("work_items").await, 1);
    assert_eq!(h.count("devices").await, 1);
    // Times written differently are the same command too.
    let e1 = r#"{"transaction_id":"T2","device_id":42,"product_id":1,"start":"2024-01-01T00:00:00Z","end":1893456000}"#;
    let e2 = r#"{"transaction_id":"T2","device_id":42,"product_id":1,"start":1704067200,"end":"2030-01-01T00:00:00Z"}"#;
    let a = h.ok("/addentitlement", e1).await;
    let b = h.ok("/addentitlement", e2).await;
    assert_eq!(a, b);
    // Different body, or another path, with the same transaction_id: 409.
    let (s, v, _) = h
        .post("/adddevice", r#"{"transaction_id":"T1","device_id":43}"#)
        .await;
    assert_error(s, &v, 409, "transaction_reused", Some("transaction_id"));
    let (s, v, _) = h
        .post("/removedevice", r#"{"transaction_id":"T1","device_id":42}"#)
        .await;
    assert_error(s, &v, 409, "transaction_reused", Some("transaction_id"));
    // Another sender has its own transaction_id space.
    let (s, _, _) = h
        .post_as(
            "sms2",
            "/adddevice",
            r#"{"transaction_id":"T1","device_id":43}"#,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(h.count("work_items").await, 3);
}

#[tokio::test]
async fn concurrent_duplicates_make_one_request_and_one_work_item() {
    let h = std::sync::Arc::new(Headend::start().await);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let h = h.clone();
        set.spawn(async move {
            h.post("/adddevice", r#"{"transaction_id":"dup","device_id":77}"#)
                .await
        });
    }
    let mut ids = BTreeSet::new();
    while let Some(r) = set.join_next().await {
        let (s, v, _) = r.unwrap();
        assert_eq!(s, 200, "{v}");
        ids.insert(v["request_id"].as_u64().unwrap());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(h.count("work_items").await, 1);
    assert_eq!(h.count("devices").await, 1);
    assert_eq!(h.count("idempotency").await, 1);
    assert_eq!(h.count("sms_requests").await, 20);
    // The same device under 10 different transaction_ids: one is added,
    // the others are told it exists.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..10 {
        let h = h.clone();
        set.spawn(async move {
            h.post(
                "/adddevice",
                &format!(r#"{{"transaction_id":"c{i}","device_id":78}}"#),
            )
            .await
        });
    }
    let mut statuses = Vec::new();
    while let Some(r) = set.join_next().await {
        statuses.push(r.unwrap().0);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 409, 409, 409, 409, 409, 409, 409, 409, 409]);
    assert_eq!(h.count("work_items").await, 2);
}

#[tokio::test]
async fn group_slots_fill_in_order_and_freed_slots_are_reused() {
    let h = std::sync::Arc::new(Headend::start().await);
    // 258 devices, 8 at a time: groups 1 (full) and 2 (two slots).
    let mut set = tokio::task::JoinSet::new();
    for w in 0..8u64 {
        let h = h.clone();
        set.spawn(async move {
            let mut i = w;
            while i < 258 {
                h.add_device(10_000 + i).await;
                i += 8;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let mut c = h.db().conn().await.unwrap();
    let slots: Vec<(u32, u8)> = c
        .query("SELECT group_id, slot FROM devices WHERE state = 'enabled' ORDER BY group_id, slot")
        .await
        .unwrap();
    let want: Vec<(u32, u8)> = (0..=255u8)
        .map(|s| (1, s))
        .chain([(2, 0), (2, 1)])
        .collect();
    assert_eq!(slots, want);
    assert_eq!(h.count("group_slots").await, 512);
    // group_slots agrees with devices.
    let mismatched: Option<u64> = c
        .query_first(
            "SELECT COUNT(*) FROM devices d LEFT JOIN group_slots g ON g.device_id = d.device_id \
             WHERE d.state = 'enabled' AND (g.group_id <> d.group_id OR g.slot <> d.slot OR g.device_id IS NULL)",
        )
        .await
        .unwrap();
    assert_eq!(mismatched, Some(0));

    // Free (1, 5) and (1, 9); the next two devices take them, lowest first.
    let at: Vec<(u32, u8, u64)> = c
        .query("SELECT group_id, slot, device_id FROM devices WHERE group_id = 1 AND slot IN (5, 9) ORDER BY slot")
        .await
        .unwrap();
    let (d5, d9) = (at[0].2, at[1].2);
    h.ok(
        "/removedevice",
        &format!(r#"{{"transaction_id":"rm9","device_id":{d9}}}"#),
    )
    .await;
    h.ok(
        "/removedevice",
        &format!(r#"{{"transaction_id":"rm5","device_id":{d5}}}"#),
    )
    .await;
    h.add_device(20_001).await;
    h.add_device(20_002).await;
    let (_, a) = h.get("/devices/20001").await;
    let (_, b) = h.get("/devices/20002").await;
    assert_eq!((&a["group_id"], &a["slot"]), (&json!(1), &json!(5)));
    assert_eq!((&b["group_id"], &b["slot"]), (&json!(1), &json!(9)));
    // Re-adding a removed device enables it again, in the next free slot,
    // with its old entitlements still ended.
    h.ok(
        "/removedevice",
        r#"{"transaction_id":"rm-20001","device_id":20001}"#,
    )
    .await;
    h.ok(
        "/adddevice",
        r#"{"transaction_id":"re-add","device_id":20001}"#,
    )
    .await;
    let (_, a) = h.get("/devices/20001").await;
    assert_eq!(a["state"], "enabled");
    assert_eq!((&a["group_id"], &a["slot"]), (&json!(1), &json!(5)));
    let mut c = h.db().conn().await.unwrap();
    let p: Option<String> = c
        .query_first("SELECT payload FROM work_items ORDER BY id DESC LIMIT 1")
        .await
        .unwrap();
    let p: Value = serde_json::from_str(&p.unwrap()).unwrap();
    assert_eq!(p["kind"], "adddevice");
    assert_eq!(p["reenabled"], true);
}

#[tokio::test]
async fn unreachable_database_is_503_with_retry_after_promptly() {
    // Nothing listens on 127.0.0.1:1: connections are refused at once.
    let url = "mysql://casd:pw@127.0.0.1:1/casd";
    let db = casd::db::Db::new(url, 2, Duration::from_secs(2)).unwrap();
    let h = Headend::serve(url, db, |_| {}).await;
    let t0 = Instant::now();
    let (s, v, hdr) = h
        .post("/adddevice", r#"{"transaction_id":"x","device_id":1}"#)
        .await;
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_error(s, &v, 503, "unavailable", None);
    assert_eq!(hdr["retry-after"], "2");
    // A malformed request cannot even be authenticated (the token check
    // needs the database: key set, client enabled): 503 too.
    let (s, _, _) = h.post("/adddevice", "{").await;
    assert_eq!(s, 503);
    let (s, v) = h.get("/devices/1").await;
    assert_error(s, &v, 503, "unavailable", None);
    let lines = h.log_lines().await;
    let posts: Vec<&Value> = lines.iter().filter(|l| l["method"] == "POST").collect();
    assert_eq!(posts.len(), 2);
    // Neither could be authenticated: they are in the request log only.
    assert!(
        posts
            .iter()
            .all(|l| l["status"] == 503 && l["sender"].is_null()),
        "{posts:?}"
    );
    assert_eq!(posts[0]["status"], 503);
}
