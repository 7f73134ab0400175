//! Logging set-up (SPEC §8, §11): env_logger, with `RUST_LOG` for the
//! level, writing plain text or one JSON object per line (`--log-format
//! json`): `ts` (RFC 3339, UTC, milliseconds), `level`, `target`, `msg`,
//! and `id` when the line is about one request.
//!
//! Log lines name their request in the text ("request {id}: ..."), so the
//! `id` is the first request id found in the message: the lines stay the
//! same in both formats, and no call site has to repeat the id as a field.

use std::io::Write;

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::macros::format_description;

use crate::config::LogFormat;
use crate::model::RequestId;

/// Installs the logger; `info` unless `RUST_LOG` says otherwise.
pub fn init(format: LogFormat) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if format == LogFormat::Json {
        builder.format(|buf, record| {
            let line = json_line(
                OffsetDateTime::now_utc(),
                record.level().as_str(),
                record.target(),
                &record.args().to_string(),
            );
            writeln!(buf, "{line}")
        });
    }
    builder.init();
}

/// One log line as a JSON object (serde_json escapes what needs it, so a
/// message with quotes or newlines stays one line).
pub fn json_line(at: OffsetDateTime, level: &str, target: &str, msg: &str) -> String {
    let ts = at
        .to_offset(time::UtcOffset::UTC)
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        ))
        .unwrap_or_default();
    let mut line = Map::new();
    line.insert("ts".into(), Value::String(ts));
    line.insert("level".into(), Value::String(level.to_string()));
    line.insert("target".into(), Value::String(target.to_string()));
    line.insert("msg".into(), Value::String(msg.to_string()));
    if let Some(id) = request_id_in(msg) {
        line.insert("id".into(), Value::String(id));
    }
    Value::Object(line).to_string()
}

/// The first request id in `msg`: a whole word of 26 characters in the
/// canonical (upper-case) form that parses as one.
fn request_id_in(msg: &str) -> Option<String> {
    msg.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| word.len() == 26 && !word.bytes().any(|b| b.is_ascii_lowercase()))
        .find_map(|word| word.parse::<RequestId>().ok())
        .map(|id| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_the_request_id_when_there_is_one() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_764_460_238_007_000_000).unwrap();
        let id = RequestId::generate().to_string();
        let line = json_line(
            at,
            "WARN",
            "asyncgate::dispatcher",
            &format!("request {id}: upstream not reached (\"refused\"\nagain); retried"),
        );
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ts"], "2025-11-29T23:50:38.007Z");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["target"], "asyncgate::dispatcher");
        assert_eq!(v["id"], id.as_str());
        assert!(v["msg"].as_str().unwrap().contains("\"refused\"\nagain"));
        let plain = json_line(at, "INFO", "asyncgate::app", "asyncgate listening on x");
        let v: Value = serde_json::from_str(&plain).unwrap();
        assert!(v.get("id").is_none(), "{plain}");
        // 26 letters that are no ULID (I, L, O and U are not in its alphabet).
        assert_eq!(request_id_in("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), None);
    }
}
