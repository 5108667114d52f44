//! `POST /bulk` (sms-api.md "Bulk"): a result per item, each what its
//! single route would answer and recorded as a request of its own; bulk
//! adds paced and marked bulk, removals not delayed; hostile sizes refused
//! whole with nothing stored.

use crate::sms_common::Headend;
use mysql_async::prelude::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_item_gets_its_own_result_and_record() {
    let h = Headend::start().await;
    h.add_device(9).await;
    let body = json!({"commands": [
        {"command": "adddevice", "transaction_id": "b1", "device_id": 1},
        {"command": "addentitlement", "transaction_id": "b2", "device_id": 1, "product_id": 7, "start": 1767225600, "end": 1798761600},
        {"command": "adddevice", "transaction_id": "b3", "device_id": 0},
        {"command": "addentitlement", "transaction_id": "b4", "device_id": 2, "product_id": 7, "start": 1767225600, "end": 1798761600},
        {"command": "frobnicate", "transaction_id": "b5"},
        {"command": "removedevice", "transaction_id": "b6", "device_id": 9},
        {"command": "adddevice", "transaction_id": "b1", "device_id": 1}
    ]});
    let (status, v, _) = h.post("/bulk", &body.to_string()).await;
    assert_eq!(status, 200, "{v}");
    let statuses: Vec<u64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 200, 400, 404, 400, 200, 200]);
    let r = &v["results"];
    assert_eq!(r[0]["body"]["status"], "accepted");
    assert_eq!(r[3]["body"]["error"]["code"], "unknown_device");
    assert_eq!(r[4]["body"]["error"]["field"], "command");
    // The last is a replay of the first: the same stored reply.
    assert_eq!(r[6]["body"], r[0]["body"]);

    let mut c = h.db().conn().await.unwrap();
    // Every item recorded (the set-up's adddevice of 9 too).
    let rows: u64 = c
        .query_first("SELECT COUNT(*) FROM sms_requests")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rows, 1 + 7);
    // The adds are bulk and paced; the removal is neither.
    let items: Vec<(String, String, i64)> = c
        .query(
            "SELECT kind, payload, CAST(TIMESTAMPDIFF(MICROSECOND, created_at, not_before) AS SIGNED) \
             FROM work_items WHERE request_id IS NOT NULL ORDER BY id",
        )
        .await
        .unwrap();
    // (The entitlement of device 1 is stored in the round after its add.)
    let bulk: Vec<(&str, bool)> = items
        .iter()
        .map(|(k, p, _)| (k.as_str(), p.contains("\"bulk\":true")))
        .collect();
    assert_eq!(
        bulk,
        [
            ("adddevice", false),
            ("adddevice", true),
            ("removedevice", false),
            ("addentitlement", true)
        ]
    );
    assert!(items[2].2 <= 0, "a removal must not be delayed");
    assert!(items[3].2 > items[1].2, "bulk items are spaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sizes_are_refused_whole_and_store_nothing() {
    let h = Headend::start().await;
    let item = json!({"command": "adddevice", "transaction_id": "x", "device_id": 1});
    for (body, code) in [
        (
            json!({"commands": vec![item.clone(); 101]}),
            "invalid_request",
        ),
        (json!({"commands": []}), "invalid_request"),
        (json!({"commands": [1]}), "invalid_request"),
        (
            json!({"commands": [item.clone()], "more": 1}),
            "unknown_field",
        ),
        (json!([item.clone()]), "invalid_request"),
    ] {
        let (status, v, _) = h.post("/bulk", &body.to_string()).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(code)),
            "{v}"
        );
    }
    let big = "x".repeat(2 * 1024 * 1024);
    let (status, _, _) = h.post("/bulk", &big).await;
    assert_eq!(status, 413);
    assert_eq!(h.count("sms_requests").await, 0);
    assert_eq!(h.count("work_items").await, 0);
}
