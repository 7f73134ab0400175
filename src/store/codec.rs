//! Every encode and decode of a stored value, in one place. bincode is
//! pinned at 1.3.3 (3.0 is a deliberate compile error and the crate is
//! unmaintained), so each value starts with a format-version byte: the codec
//! can change later without breaking data already on disk.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;

/// The format of every value written by this version.
const FORMAT_V1: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![FORMAT_V1];
    bincode::serialize_into(&mut out, value).map_err(|e| StoreError::Codec(e.to_string()))?;
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, rest)) => {
            bincode::deserialize(rest).map_err(|e| StoreError::Codec(e.to_string()))
        }
        Some((v, _)) => Err(StoreError::Codec(format!("unknown format version {v}"))),
        None => Err(StoreError::Codec("empty value".into())),
    }
}

pub fn u64_be(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[8 - n..].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_carries_the_version_byte() {
        let v = encode(&("a".to_string(), 7u64)).unwrap();
        assert_eq!(v[0], FORMAT_V1);
        let back: (String, u64) = decode(&v).unwrap();
        assert_eq!(back, ("a".to_string(), 7));
    }

    #[test]
    fn unknown_versions_and_garbage_are_errors_not_panics() {
        assert!(decode::<u64>(&[9, 1, 2]).is_err());
        assert!(decode::<u64>(&[]).is_err());
        assert!(decode::<String>(&[FORMAT_V1, 0xff]).is_err());
    }
}
