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

fn cat_line(v: &Value) -> String {
    let descs: Vec<String> = v["ca_descriptors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            format!(
                "CA_system_ID {} -> EMM PID {}",
                hex16(&d["ca_system_id"]),
                hex16(&d["ca_pid"])
            )
        })
        .collect();
    format!(
        "CAT  {} pid {} version {}: {}",
        t_str(v),
        hex16(&v["pid"]),
        v["version"],
        descs.join("; ")
    )
}

fn section_line(v: &Value) -> String {
    format!(
        "SECT {} pid {} table_id {:#04x} {} bytes",
        t_str(v),
        hex16(&v["pid"]),
        v["table_id"].as_u64().unwrap_or(0),
        v["len"]
    )
}

/// An EMM line, and on its first sighting one line per command.
fn emm_lines(v: &Value) -> String {
    let repeat = if v.get("repeat").is_some() {
        format!(" (repeat #{})", v["count"])
    } else {
        String::new()
    };
    let mut out = format!(
        "EMM  {} pid {} {} ext {} key_version {} {} bytes: {}{}\n",
        t_str(v),
        hex16(&v["pid"]),
        address_str(&v["address"]),
        hex16(&v["table_id_extension"]),
        v["key_version"],
        v["len"],
        emm_status(v),
        repeat
    );
    if v.get("repeat").is_none() {
        for c in v["commands"].as_array().into_iter().flatten() {
            out.push_str(&format!("       {}\n", command_str(c)));
        }
    }
    out
}

fn emm_status(v: &Value) -> String {
    match v["mac"].as_str() {
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
    }
}

fn error_line(v: &Value) -> String {
    format!(
        "ERR  {} pid {} [{}] {}",
        t_str(v),
        v["pid"]
            .as_u64()
            .map(|p| format!("{p:#06x}"))
            .unwrap_or_else(|| "-".into()),
        v["kind"].as_str().unwrap_or("?"),
        v["message"].as_str().unwrap_or("")
    )
}

/// The human summary: totals, one line per PID, sections, errors, cycle
/// times and one line per EMM.
fn summary_text(v: &Value) -> String {
    let mut lines = vec![summary_head(v)];
    lines.extend(v["pids"].as_array().into_iter().flatten().map(pid_line));
    lines.push(sections_line(v));
    lines.push(errors_line(&v["errors"]));
    let c = &v["cycle"];
    let unit = c["unit"].as_str().unwrap_or("");
    if c["emms"].as_u64().unwrap_or(0) > 0 {
        lines.push(format!(
            "  cycle time per EMM ({unit}): min {} / median of medians {} / max {} over {} EMMs",
            c["min"], c["median_of_medians"], c["max"], c["emms"]
        ));
    }
    let per_emm = v["per_emm"].as_array().into_iter().flatten();
    lines.extend(per_emm.map(|e| per_emm_line(e, unit)));
    if v["per_emm_truncated"] == Value::Bool(true) {
        lines.push("    … (more EMMs; raise --per-emm)".into());
    }
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn summary_head(v: &Value) -> String {
    format!(
        "summary{}: {} packets{}, {} datagrams ({} RTP)",
        if v["final"] == Value::Bool(true) {
            ""
        } else {
            " (so far)"
        },
        v["packets"],
        v["duration_s"]
            .as_f64()
            .map(|d| format!(" in {d:.3} s"))
            .unwrap_or_default(),
        v["datagrams"],
        v["rtp_datagrams"]
    )
}

fn pid_line(p: &Value) -> String {
    let rate = p["bitrate_bps"]
        .as_f64()
        .map(|b| format!("{:.1} kbit/s", b / 1000.0))
        .unwrap_or_else(|| "bitrate unknown (no timing)".into());
    format!(
        "  PID {}  {} packets  {}  {} sections  {} CC errors",
        hex16(&p["pid"]),
        p["packets"],
        rate,
        p["sections"],
        p["cc_errors"]
    )
}

fn sections_line(v: &Value) -> String {
    let e = &v["emm_sections"];
    let d = &v["emms_distinct"];
    format!(
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
    )
}

fn errors_line(er: &Value) -> String {
    format!(
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
    )
}

fn per_emm_line(e: &Value, unit: &str) -> String {
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
    format!(
        "    {id} ({}): {}x, {cycle}",
        address_str(&e["address"]),
        e["count"]
    )
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
            "cat" => writeln!(o, "{}", cat_line(v)),
            "section" => writeln!(o, "{}", section_line(v)),
            "emm" => write!(o, "{}", emm_lines(v)),
            "error" => writeln!(o, "{}", error_line(v)),
            "summary" => write!(o, "{}", summary_text(v)),
            "audit" => crate::audit::print_human(o, v),
            _ => writeln!(o, "{v}"),
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn emm_lines_list_commands_on_first_sighting_only() {
        let mut v = json!({"type": "emm", "t": 1.5, "pid": 257, "address": {"mode": "global"},
            "table_id_extension": 3, "key_version": 1, "len": 80, "mac": "no_key",
            "error": "no GLK version 1", "commands": [{"type": "device_enable"}]});
        assert_eq!(
            emm_lines(&v),
            "EMM  t=1.500s pid 0x0101 global ext 0x0003 key_version 1 80 bytes: not opened: no GLK version 1\n       DEVICE_ENABLE\n"
        );
        v["repeat"] = json!(true);
        v["count"] = json!(4);
        assert!(emm_lines(&v).ends_with(" (repeat #4)\n"));
    }

    #[test]
    fn summary_lines() {
        let v = json!({"final": false, "packets": 10, "duration_s": null, "datagrams": 0,
            "rtp_datagrams": 0, "pids": [{"pid": 1, "packets": 2, "bitrate_bps": 1500.0,
            "sections": 1, "cc_errors": 0}], "cycle": {"unit": "ms", "emms": 0},
            "per_emm": [{"emm_id": null, "table_id_extension": 9, "address": {"mode": "global"},
            "count": 1, "cycle": null}], "per_emm_truncated": true});
        let text = summary_text(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "summary (so far): 10 packets, 0 datagrams (0 RTP)"
        );
        assert_eq!(
            lines[1],
            "  PID 0x0001  2 packets  1.5 kbit/s  1 sections  0 CC errors"
        );
        assert_eq!(lines[4], "    ext 0x0009 (global): 1x, seen once");
        assert_eq!(lines[5], "    … (more EMMs; raise --per-emm)");
        assert_eq!(lines.len(), 6);
    }
}
