//! Key encodings. Integers and times are big-endian so that sled's byte
//! order is their numeric order: lanes iterate in sequence, expiries and
//! callbacks in due time.

use crate::model::{LaneKey, RequestId, Status};

/// The `counters` key of a journal segment's count of live blobs (bodies
/// and responses still referenced).
pub fn segment(segment: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b's';
    k[1..].copy_from_slice(&segment.to_be_bytes());
    k
}

/// An `Idempotency-Key` (hashed) is per credential: 16 bytes of SHA-256
/// of its lane and the key's hash. Short enough for sled to keep inline
/// and the in-memory index small; a lookup still checks the record it
/// finds has this lane and key (`change::Tx::idempotent`).
pub fn idempotency(lane: &LaneKey, key: &[u8; 32]) -> [u8; 16] {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(lane)
        .chain_update(key)
        .finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&digest[..16]);
    k
}

/// Sequence numbers a `bucket` counter covers (a power of two).
pub const BUCKET_SEQS: u64 = 1 << 12;

/// The `counters` key of a lane's count of queued requests whose sequence
/// numbers fall in one bucket: `ahead` sums buckets instead of walking a
/// long queue.
pub fn bucket(lane: &LaneKey, seq: u64) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = b'b';
    k[1..33].copy_from_slice(lane);
    k[33..].copy_from_slice(&(seq / BUCKET_SEQS).to_be_bytes());
    k
}

pub fn lane(lane: &LaneKey, seq: u64) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(lane);
    k[32..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The `counters` key of a lane's count of queued requests (status
/// counters are one byte, so none of the counter keys meet).
pub fn pending(lane: &LaneKey) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = b'p';
    k[1..].copy_from_slice(lane);
    k
}

/// The smallest key after every key of `lane`: where the next lane begins.
pub fn lane_end(lane: &LaneKey) -> Option<Vec<u8>> {
    let mut k = lane.to_vec();
    for i in (0..k.len()).rev() {
        if k[i] < 0xff {
            k[i] += 1;
            k.truncate(i + 1);
            return Some(k);
        }
    }
    None
}

pub fn status(status: Status, id: &RequestId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = status.code();
    k[1..].copy_from_slice(id.as_bytes());
    k
}

/// Time-ordered index keys: expiry and callback due times.
pub fn timed(at_ms: u64, id: &RequestId) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&at_ms.to_be_bytes());
    k[8..].copy_from_slice(id.as_bytes());
    k
}

pub fn split_timed(k: &[u8]) -> Option<(u64, RequestId)> {
    if k.len() != 24 {
        return None;
    }
    let mut at = [0u8; 8];
    at.copy_from_slice(&k[..8]);
    Some((u64::from_be_bytes(at), id_from(&k[8..])?))
}

pub fn id_from(b: &[u8]) -> Option<RequestId> {
    let arr: [u8; 16] = b.try_into().ok()?;
    Some(RequestId(arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_keys_sort_by_sequence() {
        let l = [7u8; 32];
        assert!(lane(&l, 2) < lane(&l, 10));
        assert!(lane(&l, u64::MAX).as_slice() < lane_end(&l).unwrap().as_slice());
        assert_eq!(lane_end(&[0xff; 32]), None);
    }

    #[test]
    fn timed_keys_round_trip_and_sort_by_time() {
        let id = RequestId([3; 16]);
        assert!(timed(5, &id) < timed(300, &RequestId([0; 16])));
        assert_eq!(split_timed(&timed(42, &id)), Some((42, id)));
    }
}
