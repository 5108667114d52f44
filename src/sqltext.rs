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
    match v {
        Value::Bytes(b) => {
            if b.iter()
                .all(|c| (0x20..=0x7e).contains(c) && *c != b'\'' && *c != b'\\')
            {
                // Checked above: ASCII.
                format!("'{}'", String::from_utf8_lossy(b))
            } else if std::str::from_utf8(b).is_ok() {
                format!("_utf8mb4 X'{}'", hex::encode(b))
            } else {
                format!("X'{}'", hex::encode(b))
            }
        }
        // NULL, integers, floats, dates and times: no quotes or text.
        other => other.as_sql(false),
    }
}

/// `sql` with each `?` replaced by the literal of the next value (our
/// statement texts have no other `?`).
pub fn inline(sql: &str, values: &[Value]) -> Result<String, Error> {
    let mut out = String::with_capacity(sql.len() + values.len() * 12);
    let mut it = values.iter();
    for ch in sql.chars() {
        if ch == '?' {
            let v = it
                .next()
                .ok_or_else(|| Error::Internal("fewer values than placeholders".into()))?;
            out.push_str(&lit(v));
        } else {
            out.push(ch);
        }
    }
    if it.next().is_some() {
        return Err(Error::Internal("more values than placeholders".into()));
    }
    Ok(out)
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
        self.sql.push_str(&inline(sql, values)?);
        self.sql.push_str(";\n");
        self.n += 1;
        Ok(self.n - 1)
    }

    /// Runs the script: one row set per statement (empty for statements
    /// that return none). Stops at the first failing statement (the server
    /// runs none after it) with its error.
    pub async fn run<Q: Queryable>(self, conn: &mut Q) -> Result<Vec<Vec<Row>>, Error> {
        if self.n == 0 {
            return Ok(Vec::new());
        }
        let mut result = conn.query_iter(self.sql).await?;
        let mut sets = Vec::with_capacity(self.n);
        while sets.len() < self.n {
            sets.push(result.collect::<Row>().await?);
        }
        result.drop_result().await?;
        Ok(sets)
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
