//! Standard Webhooks 1.0 signatures (SPEC §10 "Signed callbacks"), so a
//! receiver can tell the gateway's callbacks from anyone else's with any
//! Standard Webhooks library: `webhook-signature: v1,<base64 HMAC-SHA256>`
//! over `{webhook-id}.{webhook-timestamp}.{payload}`, keyed by the secret
//! in `--callback-secret-file`.
//!
//! The file holds the secret the way those libraries take it: `whsec_`,
//! then the key in base64. The gateway makes one (32 random bytes, mode
//! 0600, written durably) when the file is missing; a file it cannot read
//! as a secret stops the start, since every callback signed with a wrong
//! key would be refused by its receiver. The secret never reaches a log.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::crypto::write_secret_file;

const PREFIX: &str = "whsec_";
/// Bytes of a secret the gateway makes (the Standard Webhooks spec asks
/// for 24 to 64).
const NEW_SECRET_BYTES: usize = 32;
/// Below this a secret is accepted with a warning (the spec's minimum).
const SHORTEST_ADVISED: usize = 24;

/// Reads the base64 after `whsec_` with or without its `=` padding (the
/// libraries differ in what they write; the bytes are the same).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("callback secret file {0}: {1}")]
    File(PathBuf, std::io::Error),
    #[error(
        "callback secret file {0} is not a Standard Webhooks secret ({1}); it must hold `whsec_` followed by the key in base64. Fix it, or remove it to have a new one made (receivers then need the new secret)"
    )]
    Malformed(PathBuf, &'static str),
    #[error("no randomness available for a new callback secret")]
    Random,
}

/// Signs callbacks with one secret. No `Debug`: it would print the key.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    /// The secret in `path`, made (mode 0600) when the file is missing.
    pub fn load_or_create(path: &Path) -> Result<Signer, SecretError> {
        let io = |e| SecretError::File(path.to_path_buf(), e);
        let text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = vec![0u8; NEW_SECRET_BYTES];
                getrandom::getrandom(&mut key).map_err(|_| SecretError::Random)?;
                // No trailing newline: some libraries decode the text as
                // given and would refuse one.
                let text = format!("{PREFIX}{}", STANDARD.encode(&key));
                write_secret_file(path, text.as_bytes()).map_err(io)?;
                log::info!(
                    "made a new callback secret in {} (give it to your callback receivers)",
                    path.display()
                );
                return Ok(Signer { key });
            }
            Err(e) => return Err(io(e)),
        };
        warn_if_readable_by_others(path);
        let text = std::str::from_utf8(&text)
            .map_err(|_| SecretError::Malformed(path.to_path_buf(), "it is not text"))?;
        let signer = Signer::from_secret(text)
            .map_err(|why| SecretError::Malformed(path.to_path_buf(), why))?;
        if signer.key.len() < SHORTEST_ADVISED {
            log::warn!(
                "the callback secret in {} is {} bytes; Standard Webhooks advises at least {SHORTEST_ADVISED}",
                path.display(),
                signer.key.len()
            );
        }
        Ok(signer)
    }

    /// A `whsec_<base64>` secret; whitespace around it (a final newline)
    /// is ignored.
    pub fn from_secret(text: &str) -> Result<Signer, &'static str> {
        let encoded = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or("it does not start with `whsec_`")?;
        let key = LENIENT
            .decode(encoded)
            .map_err(|_| "what follows `whsec_` is not base64")?;
        if key.is_empty() {
            return Err("the key after `whsec_` is empty");
        }
        Ok(Signer { key })
    }

    /// The `webhook-signature` value for one attempt of the message
    /// `msg_id` sent at `timestamp` (Unix seconds) with `payload`.
    pub fn sign(&self, msg_id: &str, timestamp: u64, payload: &[u8]) -> String {
        // HMAC takes a key of any length, so this cannot fail; the empty
        // key of the fallback is never used (`from_secret` refuses it).
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        log::warn!(
            "callback secret file {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_standard_webhooks_test_vector() {
        // The published example every Standard Webhooks library tests.
        let s = Signer::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_read_with_or_without_padding_and_a_final_newline() {
        let a = Signer::from_secret("whsec_dGVzdHNlY3JldA==\n").unwrap();
        let b = Signer::from_secret("whsec_dGVzdHNlY3JldA").unwrap();
        assert_eq!(a.key, b"testsecret");
        assert_eq!(a.key, b.key);
    }

    #[test]
    fn malformed_secrets_are_refused() {
        for bad in [
            "",
            "whsec_",
            "dGVzdHNlY3JldA==",
            "WHSEC_dGVzdHNlY3JldA==",
            "whsec_not base64!",
            "whsec_dGVz-dA",
        ] {
            assert!(Signer::from_secret(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_file_is_made_with_mode_0600_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let made = Signer::load_or_create(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("whsec_") && !text.ends_with('\n'),
            "{text}"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Signer::load_or_create(&path).unwrap();
        assert_eq!(made.key, again.key);
        assert_eq!(made.key.len(), NEW_SECRET_BYTES);
        assert!(!dir.path().join("secret.new").exists());
    }

    #[test]
    fn a_malformed_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "hunter2").unwrap();
        let e = Signer::load_or_create(&path).err().unwrap().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("whsec_"), "{e}");
        assert!(!e.contains("hunter2"), "the file's content stays out: {e}");
    }
}
