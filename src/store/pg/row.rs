//! A `requests` row and a `RequestRecord`, both ways.

use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use super::super::{StoreError, codec};
use crate::model::{
    Callback, CallbackState, Header, Idempotency, LaneKey, Outcome, RequestId, RequestRecord,
    Status,
};

/// The columns `record` reads, in its order.
pub const COLS: &str = "id, lane, seq, status, claims, attempts, created_ms, started_ms, \
     finished_ms, expires_ms, sealed, request, outcome, callback_state";

/// What never changes once a request is stored: one encoded value.
#[derive(Serialize, Deserialize)]
pub struct Fixed {
    pub method: String,
    pub target: String,
    pub headers: Vec<Header>,
    pub callback: Option<Callback>,
    pub idempotency: Option<Idempotency>,
}

/// Milliseconds and sequence numbers as PostgreSQL's `bigint`.
pub fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub fn small(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn unbig(v: Option<i64>) -> Option<u64> {
    v.map(|v| u64::try_from(v).unwrap_or(0))
}

pub fn status(code: i16) -> Result<Status, StoreError> {
    Status::ALL
        .into_iter()
        .find(|s| i16::from(s.code()) == code)
        .ok_or_else(|| StoreError::Codec(format!("unknown status {code}")))
}

pub fn code(status: Status) -> i16 {
    i16::from(status.code())
}

pub fn id(bytes: &[u8]) -> Result<RequestId, StoreError> {
    <[u8; 16]>::try_from(bytes)
        .map(RequestId)
        .map_err(|_| StoreError::Codec("a request id of the wrong length".into()))
}

pub fn lane(bytes: &[u8]) -> Result<LaneKey, StoreError> {
    <LaneKey>::try_from(bytes).map_err(|_| StoreError::Codec("a lane of the wrong length".into()))
}

fn optional<T: serde::de::DeserializeOwned>(v: Option<Vec<u8>>) -> Result<Option<T>, StoreError> {
    v.map(|b| codec::decode(&b)).transpose()
}

/// A row selected with `COLS`.
pub fn record(row: &Row) -> Result<RequestRecord, StoreError> {
    let fixed: Fixed = codec::decode(row.try_get::<_, &[u8]>(11)?)?;
    Ok(RequestRecord {
        id: id(row.try_get(0)?)?,
        lane: lane(row.try_get(1)?)?,
        seq: u64::try_from(row.try_get::<_, i64>(2)?).unwrap_or(0),
        status: status(row.try_get(3)?)?,
        claims: u32::try_from(row.try_get::<_, i32>(4)?).unwrap_or(0),
        attempts: u32::try_from(row.try_get::<_, i32>(5)?).unwrap_or(0),
        created_ms: unbig(Some(row.try_get(6)?)).unwrap_or(0),
        started_ms: unbig(row.try_get(7)?),
        finished_ms: unbig(row.try_get(8)?),
        expires_ms: unbig(row.try_get(9)?),
        sealed: row.try_get(10)?,
        method: fixed.method,
        target: fixed.target,
        headers: fixed.headers,
        callback: fixed.callback,
        idempotency: fixed.idempotency,
        outcome: optional::<Outcome>(row.try_get(12)?)?,
        callback_state: optional::<CallbackState>(row.try_get(13)?)?,
        // Bodies and responses are columns of their own here.
        body: None,
        response: None,
    })
}
