//! SQL sent as text with its values inlined, several statements per round
//! trip ([`Script`]). For the hot paths whose statement shapes change with
//! every batch (rows, IN lists): a prepared statement per shape would cost
//! a PREPARE round trip each and churn the statement cache, and a batch of
//! dependent statements would cost a round trip each.
//!
//! Safety: [`lit`] never escapes anything. A string that is not plain
//! printable ASCII without `'` and `\` goes as a hex literal, so no byte a
//! client sent is ever parsed as SQL, whatever the session's `sql_mode`.

use mysql_async::prelude::{FromValue, Queryable};
use mysql_async::{Row, Value};

/// A script that could not be built or whose results were not as expected,
/// or the database's own error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Db(#[from] mysql_async::Error),
}

/// A SQL literal for `v`, the same under every `sql_mode` (with or without
/// NO_BACKSLASH_ESCAPES): numbers and dates as digits; strings made only of
/// printable ASCII other than `'` and `\` between quotes; every other
/// string as a hex literal with a utf8mb4 introducer (`_utf8mb4 X'…'`), and
/// bytes that are not UTF-8 as a plain hex literal. Nothing a client sends
/// is ever parsed as SQL: no escaping is involved at all.
pub fn lit(v: &Value) -> String {
    let mut out = String::new();
    push_lit(&mut out, v);
    out
}

/// [`lit`], appended to `out` (a round's script is built in one buffer:
/// building a string per value was half of the committer's own CPU).
fn push_lit(out: &mut String, v: &Value) {
    use std::fmt::Write;
    match v {
        Value::Bytes(b) => {
            if b.iter()
                .all(|c| (0x20..=0x7e).contains(c) && *c != b'\'' && *c != b'\\')
            {
                out.push('\'');
                // Checked above: printable ASCII, so one char per byte.
                out.extend(b.iter().map(|c| char::from(*c)));
                out.push('\'');
            } else {
                if std::str::from_utf8(b).is_ok() {
                    out.push_str("_utf8mb4 ");
                }
                out.push_str("X'");
                out.reserve(b.len() * 2 + 1);
                // Through a stack buffer: no string per value.
                let mut buf = [0u8; 128];
                for chunk in b.chunks(buf.len() / 2) {
                    let hex = &mut buf[..chunk.len() * 2];
                    if hex::encode_to_slice(chunk, hex).is_ok() {
                        // Hex digits: ASCII.
                        out.push_str(std::str::from_utf8(hex).unwrap_or_default());
                    }
                }
                out.push('\'');
            }
        }
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        Value::NULL => out.push_str("NULL"),
        // As `as_sql` writes them, without a string per value.
        Value::Date(y, mo, d, 0, 0, 0, 0) => {
            let _ = write!(out, "'{y:04}-{mo:02}-{d:02}'");
        }
        Value::Date(y, mo, d, h, mi, s, 0) => {
            let _ = write!(out, "'{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}'");
        }
        Value::Date(y, mo, d, h, mi, s, us) => {
            let _ = write!(out, "'{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}'");
        }
        // Floats and times: no quotes or text.
        other => out.push_str(&other.as_sql(false)),
    }
}

/// `sql` with each `?` replaced by the literal of the next value (our
/// statement texts have no other `?`).
pub fn inline(sql: &str, values: &[Value]) -> Result<String, Error> {
    let mut out = String::with_capacity(sql.len() + values.len() * 12);
    inline_into(&mut out, sql, values)?;
    Ok(out)
}

/// [`inline`], appended to `out`. On an error `out` may hold part of the
/// statement (a [`Script`] is then dropped, never run).
fn inline_into(out: &mut String, sql: &str, values: &[Value]) -> Result<(), Error> {
    let mut it = values.iter();
    let mut parts = sql.split('?');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for part in parts {
        let v = it
            .next()
            .ok_or_else(|| Error::Internal("fewer values than placeholders".into()))?;
        push_lit(out, v);
        out.push_str(part);
    }
    if it.next().is_some() {
        return Err(Error::Internal("more values than placeholders".into()));
    }
    Ok(())
}

/// The positional values of `p` (a tuple, a `Vec<Value>`…).
pub fn values(p: impl Into<mysql_async::Params>) -> Vec<Value> {
    match p.into() {
        mysql_async::Params::Positional(v) => v,
        _ => Vec::new(),
    }
}

pub fn marks(n: usize, one: &str) -> String {
    vec![one; n].join(",")
}

/// Several statements sent as one text query (one round trip): a round is
/// a script of reads and a script of writes, then COMMIT. Statement shapes
/// (rows, IN lists) change with every batch, so prepared statements would
/// cost a PREPARE round trip each and churn the statement cache; values
/// are inlined with [`lit`] instead.
#[derive(Default)]
pub struct Script {
    sql: String,
    n: usize,
}

impl Script {
    /// Appends a statement; returns its index among the script's results.
    pub fn push(&mut self, sql: &str, values: &[Value]) -> Result<usize, Error> {
        inline_into(&mut self.sql, sql, values)?;
        self.sql.push_str(";\n");
        self.n += 1;
        Ok(self.n - 1)
    }

    /// Runs the script: one row set per statement (empty for statements
    /// that return none). Stops at the first failing statement (the server
    /// runs none after it) with its error.
    pub async fn run<Q: Queryable>(self, conn: &mut Q) -> Result<Vec<Vec<Row>>, Error> {
        Ok(self.run_counted(conn).await?.0)
    }

    /// [`Script::run`], with each statement's affected-row count (from its
    /// OK packet; 0 for a statement that returns rows).
    pub async fn run_counted<Q: Queryable>(
        self,
        conn: &mut Q,
    ) -> Result<(Vec<Vec<Row>>, Vec<u64>), Error> {
        if self.n == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut result = conn.query_iter(self.sql).await?;
        let mut sets = Vec::with_capacity(self.n);
        let mut affected = Vec::with_capacity(self.n);
        while sets.len() < self.n {
            // Read before the set is collected: collecting reads the next
            // set's header (an OK packet replaces the count). A set with
            // columns has not had its own OK packet yet: the count there
            // is still the previous statement's.
            affected.push(if result.columns_ref().is_empty() {
                result.affected_rows()
            } else {
                0
            });
            sets.push(result.collect::<Row>().await?);
        }
        result.drop_result().await?;
        Ok((sets, affected))
    }
}

pub fn col<T: FromValue>(row: &Row, i: usize) -> Result<T, Error> {
    row.get_opt::<T, usize>(i)
        .and_then(|r| r.ok())
        .ok_or_else(|| Error::Internal(format!("unexpected value in result column {i}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn literals_are_plain_only_for_harmless_ascii() {
        assert_eq!(lit(&Value::from("sms-1 a.b:c/d")), "'sms-1 a.b:c/d'");
        assert_eq!(lit(&Value::from("it's")), "_utf8mb4 X'69742773'");
        assert_eq!(lit(&Value::from("a\\b")), "_utf8mb4 X'615c62'");
        assert_eq!(lit(&Value::from("é")), "_utf8mb4 X'c3a9'");
        assert_eq!(lit(&Value::from(vec![0xffu8, 0x00])), "X'ff00'");
        assert_eq!(lit(&Value::from(42u64)), "42");
        assert_eq!(lit(&Value::NULL), "NULL");
    }

    #[test]
    fn placeholders_must_match_values() {
        assert_eq!(
            inline("SELECT ?, ?", &[Value::from(1u8), Value::from("x")]).unwrap(),
            "SELECT 1, 'x'"
        );
        assert!(inline("SELECT ?, ?", &[Value::from(1u8)]).is_err());
        assert!(inline("SELECT ?", &[Value::from(1u8), Value::from(2u8)]).is_err());
        // A `?` inside a value is data, not a placeholder.
        assert_eq!(
            inline("SELECT ?", &[Value::from("a?b")]).unwrap(),
            "SELECT 'a?b'"
        );
    }

    proptest! {
        #[test]
        fn numbers_and_dates_are_written_as_mysql_common_writes_them(
            i in any::<i64>(), u in any::<u64>(),
            y in 0u16..10000, mo in 1u8..13, d in 1u8..29,
            h in 0u8..24, mi in 0u8..60, s in 0u8..60, us in 0u32..1_000_000,
        ) {
            for v in [
                Value::Int(i),
                Value::UInt(u),
                Value::NULL,
                Value::Date(y, mo, d, 0, 0, 0, 0),
                Value::Date(y, mo, d, h, mi, s, 0),
                Value::Date(y, mo, d, h, mi, s, us),
                Value::Double(1.5),
            ] {
                prop_assert_eq!(lit(&v), v.as_sql(false));
            }
        }

        #[test]
        fn no_string_can_close_its_literal(s in ".*", b in proptest::collection::vec(any::<u8>(), 0..64)) {
            for v in [Value::from(s.as_str()), Value::from(b.clone())] {
                let l = lit(&v);
                // Either 'plain' with no quote or backslash inside, or hex digits only.
                if let Some(inner) = l.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')) {
                    prop_assert!(!inner.contains('\'') && !inner.contains('\\'));
                    prop_assert!(inner.bytes().all(|c| (0x20..=0x7e).contains(&c)));
                } else {
                    let hex = l
                        .strip_prefix("_utf8mb4 X'")
                        .or_else(|| l.strip_prefix("X'"))
                        .and_then(|x| x.strip_suffix('\''));
                    prop_assert!(hex.is_some_and(|h| h.bytes().all(|c| c.is_ascii_hexdigit())), "{}", l);
                }
            }
        }
    }
}
