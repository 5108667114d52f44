//! Printing records: JSON lines (`--json`) or human-readable lines.

use std::io::{self, Write};

use serde_json::Value;

fn unix_str(v: &Value) -> String {
    match v.as_i64() {
        Some(s) => match time::OffsetDateTime::from_unix_timestamp(s) {
            Ok(t) => {
                let f = time::macros::format_description!(
                    "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
                );
                t.format(&f).unwrap_or_else(|_| s.to_string())
            }
            Err(_) => s.to_string(),
        },
        None => "?".into(),
    }
}

fn hex16(v: &Value) -> String {
    v.as_u64()
        .map(|n| format!("{n:#06x}"))
        .unwrap_or_else(|| "?".into())
}

fn t_str(v: &Value) -> String {
    match v.get("t").and_then(Value::as_f64) {
        Some(t) => format!("t={t:.3}s"),
        None => format!("packet {}", v.get("packet").unwrap_or(&Value::Null)),
    }
}

/// "unique device 77", "group 3 slots [5, 9]", "global".
pub fn address_str(a: &Value) -> String {
    match a.get("mode").and_then(Value::as_str) {
        Some("unique") => format!("unique device {}", a["device_id"]),
        Some("group") => format!("group {} slots {}", a["group_id"], a["slots"]),
        Some("global") => "global".into(),
        _ => "?".into(),
    }
}

fn command_str(c: &Value) -> String {
    let ty = c.get("type").and_then(Value::as_str).unwrap_or("?");
    let mut fields: Vec<String> = Vec::new();
    if let Some(o) = c.as_object() {
        for (k, v) in o {
            if k == "type" {
                continue;
            }
            let shown = match (k.as_str(), v) {
                ("start" | "end" | "activates_at", v) if v.is_u64() => unix_str(v),
                ("key", Value::String(s)) => s.clone(),
                ("text", Value::String(s)) => format!("{s:?}"),
                (_, v) => v.to_string(),
            };
            fields.push(format!("{k}: {shown}"));
        }
    }
    if fields.is_empty() {
        ty.to_uppercase()
    } else {
        format!("{} {}", ty.to_uppercase(), fields.join(", "))
    }
}

pub struct Printer<W: Write> {
    out: W,
    json: bool,
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, json: bool) -> Self {
        Printer { out, json }
    }

    pub fn emit(&mut self, v: &Value) -> io::Result<()> {
        if self.json {
            serde_json::to_writer(&mut self.out, v)?;
            return writeln!(self.out);
        }
        let o = &mut self.out;
        match v.get("type").and_then(Value::as_str).unwrap_or("") {
            "start" => writeln!(o, "listening: {}", v["input"].as_str().unwrap_or("?")),
            "cat" => {
                let descs: Vec<String> = v["ca_descriptors"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|d| {
                                format!(
                                    "CA_system_ID {} -> EMM PID {}",
                                    hex16(&d["ca_system_id"]),
                                    hex16(&d["ca_pid"])
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                writeln!(
                    o,
                    "CAT  {} pid {} version {}: {}",
                    t_str(v),
                    hex16(&v["pid"]),
                    v["version"],
                    descs.join("; ")
                )
            }
            "section" => writeln!(
                o,
                "SECT {} pid {} table_id {:#04x} {} bytes",
                t_str(v),
                hex16(&v["pid"]),
                v["table_id"].as_u64().unwrap_or(0),
                v["len"]
            ),
            "emm" => {
                let repeat = if v.get("repeat").is_some() {
                    format!(" (repeat #{})", v["count"])
                } else {
                    String::new()
                };
                let status = match v["mac"].as_str() {
                    Some("ok") => format!(
                        "MAC ok ({}), emm_id {}, issued {}, not_after {}",
                        v["key_source"].as_str().unwrap_or("?"),
                        v["emm_id"],
                        unix_str(&v["issued_at"]),
                        unix_str(&v["not_after"])
                    ),
                    Some("fail") => "MAC FAILED (wrong key or altered section)".into(),
                    Some("no_key") => format!("not opened: {}", v["error"].as_str().unwrap_or("")),
                    _ => format!("MALFORMED: {}", v["error"].as_str().unwrap_or("")),
                };
                writeln!(
                    o,
                    "EMM  {} pid {} {} ext {} key_version {} {} bytes: {}{}",
                    t_str(v),
                    hex16(&v["pid"]),
                    address_str(&v["address"]),
                    hex16(&v["table_id_extension"]),
                    v["key_version"],
                    v["len"],
                    status,
                    repeat
                )?;
                if v.get("repeat").is_none() {
                    for c in v["commands"].as_array().into_iter().flatten() {
                        writeln!(o, "       {}", command_str(c))?;
                    }
                }
                Ok(())
            }
            "error" => writeln!(
                o,
                "ERR  {} pid {} [{}] {}",
                t_str(v),
                v["pid"]
                    .as_u64()
                    .map(|p| format!("{p:#06x}"))
                    .unwrap_or_else(|| "-".into()),
                v["kind"].as_str().unwrap_or("?"),
                v["message"].as_str().unwrap_or("")
            ),
            "summary" => self.summary(v),
            "audit" => crate::audit::print_human(o, v),
            _ => writeln!(o, "{v}"),
        }
    }

    fn summary(&mut self, v: &Value) -> io::Result<()> {
        let o = &mut self.out;
        let dur = v["duration_s"].as_f64();
        writeln!(
            o,
            "summary{}: {} packets{}, {} datagrams ({} RTP)",
            if v["final"] == Value::Bool(true) {
                ""
            } else {
                " (so far)"
            },
            v["packets"],
            dur.map(|d| format!(" in {d:.3} s")).unwrap_or_default(),
            v["datagrams"],
            v["rtp_datagrams"]
        )?;
        for p in v["pids"].as_array().into_iter().flatten() {
            let rate = p["bitrate_bps"]
                .as_f64()
                .map(|b| format!("{:.1} kbit/s", b / 1000.0))
                .unwrap_or_else(|| "bitrate unknown (no timing)".into());
            writeln!(
                o,
                "  PID {}  {} packets  {}  {} sections  {} CC errors",
                hex16(&p["pid"]),
                p["packets"],
                rate,
                p["sections"],
                p["cc_errors"]
            )?;
        }
        let e = &v["emm_sections"];
        let d = &v["emms_distinct"];
        writeln!(
            o,
            "  sections: {}{}; CAT {}; EMMs unique {} ({} distinct), group {} ({}), global {} ({}); opened {}",
            v["sections"],
            v["sections_per_s"].as_f64().map(|r| format!(" ({r:.1}/s)")).unwrap_or_default(),
            v["cat_sections"],
            e["unique"],
            d["unique"],
            e["group"],
            d["group"],
            e["global"],
            d["global"],
            v["emms_opened"]
        )?;
        let er = &v["errors"];
        writeln!(
            o,
            "  errors: CRC {}, CC {}, MAC {}, truncated {}, duplicate {}, sync {}, other {}, malformed EMM {}; no key {}; skipped bytes {}",
            er["crc"],
            er["cc"],
            er["mac"],
            er["truncated"],
            er["duplicate"],
            er["sync"],
            er["stream"].as_u64().unwrap_or(0) + er["invalid_section"].as_u64().unwrap_or(0),
            er["malformed_emm"],
            er["no_key"],
            er["skipped_bytes"]
        )?;
        let c = &v["cycle"];
        let unit = c["unit"].as_str().unwrap_or("");
        if c["emms"].as_u64().unwrap_or(0) > 0 {
            writeln!(
                o,
                "  cycle time per EMM ({unit}): min {} / median of medians {} / max {} over {} EMMs",
                c["min"], c["median_of_medians"], c["max"], c["emms"]
            )?;
        }
        for e in v["per_emm"].as_array().into_iter().flatten() {
            let cy = &e["cycle"];
            let cycle = if cy.is_null() {
                "seen once".to_owned()
            } else {
                format!(
                    "cycle min {} median {} max {} {unit}",
                    cy["min"], cy["median"], cy["max"]
                )
            };
            let id = if e["emm_id"].is_null() {
                format!("ext {}", hex16(&e["table_id_extension"]))
            } else {
                format!("emm {}", e["emm_id"])
            };
            writeln!(
                o,
                "    {id} ({}): {}x, {cycle}",
                address_str(&e["address"]),
                e["count"]
            )?;
        }
        if v["per_emm_truncated"] == Value::Bool(true) {
            writeln!(o, "    … (more EMMs; raise --per-emm)")?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
