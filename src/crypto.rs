//! Credentials at rest. The `Authorization` value is needed to run the
//! request, so it is sealed (ChaCha20-Poly1305, the request id as associated
//! data, so a sealed value cannot be moved to another request) with a key
//! kept outside the data dir. Ownership checks use a salted HMAC of it,
//! compared in constant time, which also names the credential's lane.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::model::{LaneKey, RequestId};

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "credential key file {0} is missing but sealed credentials exist; restore it (or point --credential-key-file at it)"
    )]
    KeyMissing(PathBuf),
    #[error(
        "credential key file {0} is not the key the stored credentials were sealed with (request {1}'s cannot be opened); restore the original key file (or point --credential-key-file at it)"
    )]
    WrongKey(PathBuf, RequestId),
    #[error(
        "credential key file {0} is not the key of the other nodes on this database (its key canary cannot be opened); copy theirs here (or point --credential-key-file at it)"
    )]
    NotClusterKey(PathBuf),
    #[error("credential key file {0}: {1}")]
    KeyFile(PathBuf, String),
    #[error("a sealed credential could not be opened")]
    Unseal,
    #[error("no randomness available")]
    Random,
}

const NONCE: usize = 12;

#[derive(Clone)]
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    /// Where the key came from, to name it when it turns out wrong.
    key_file: PathBuf,
}

impl Sealer {
    /// Loads the 32-byte key, creating it (mode 0600) only when no sealed
    /// credential needs an old one.
    pub fn load_or_create(path: &Path, sealed_exist: bool) -> Result<Sealer, CryptoError> {
        let err = |e: std::io::Error| CryptoError::KeyFile(path.to_path_buf(), e.to_string());
        let key = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if sealed_exist {
                    return Err(CryptoError::KeyMissing(path.to_path_buf()));
                }
                let mut key = vec![0u8; 32];
                getrandom::getrandom(&mut key).map_err(|_| CryptoError::Random)?;
                write_secret_file(path, &key).map_err(err)?;
                key
            }
            Err(e) => return Err(err(e)),
        };
        if key.len() != 32 {
            return Err(CryptoError::KeyFile(
                path.to_path_buf(),
                format!("holds {} bytes, not 32", key.len()),
            ));
        }
        Ok(Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
            key_file: path.to_path_buf(),
        })
    }

    /// The start-up check that this is the key `sealed` (the credential of
    /// request `id`) was sealed with. A wrong key file would otherwise let
    /// the gateway start and then fail every stored request at dispatch,
    /// retrying them forever; stopping the start names the file instead.
    pub fn check(&self, id: &RequestId, sealed: &[u8]) -> Result<(), CryptoError> {
        self.unseal_credential(id, sealed)
            .map(|_| ())
            .map_err(|_| CryptoError::WrongKey(self.key_file.clone(), *id))
    }

    /// The start-up check that this is the key every node sharing the
    /// database seals with: it opens their canary.
    pub fn check_canary(&self, id: &RequestId, sealed: &[u8]) -> Result<(), CryptoError> {
        self.unseal_credential(id, sealed)
            .map(|_| ())
            .map_err(|_| CryptoError::NotClusterKey(self.key_file.clone()))
    }

    pub fn seal(&self, id: &RequestId, credential: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE];
        getrandom::getrandom(&mut nonce).map_err(|_| CryptoError::Random)?;
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: credential,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Unseal)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Seals a request's credential (`None`: anonymous). The plaintext is
    /// a tag byte, then the header value, so "no header" and an empty
    /// header stay apart.
    pub fn seal_credential(
        &self,
        id: &RequestId,
        credential: Option<&[u8]>,
    ) -> Result<Vec<u8>, CryptoError> {
        let plain = match credential {
            None => vec![0],
            Some(c) => [&[1u8][..], c].concat(),
        };
        self.seal(id, &plain)
    }

    /// The credential `seal_credential` sealed (`None`: anonymous).
    pub fn unseal_credential(
        &self,
        id: &RequestId,
        sealed: &[u8],
    ) -> Result<Option<Vec<u8>>, CryptoError> {
        let plain = self.unseal(id, sealed)?;
        match plain.split_first() {
            Some((0, [])) => Ok(None),
            Some((1, c)) => Ok(Some(c.to_vec())),
            _ => Err(CryptoError::Unseal),
        }
    }

    pub fn unseal(&self, id: &RequestId, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < NONCE {
            return Err(CryptoError::Unseal);
        }
        let (nonce, msg) = sealed.split_at(NONCE);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Unseal)
    }
}

/// Writes a new secret file (mode 0600) so that a crash or a power cut at
/// any moment leaves either no file or the whole secret: written and
/// fsync'd under a temporary name, renamed into place, the directory
/// fsync'd. (A key file cut short would stop every later start.) The
/// credential key and the callback secret (`callback::sign`) are made so.
pub(crate) fn write_secret_file(path: &Path, key: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp); // a leftover of an earlier crash
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(key)?;
    f.sync_all()?;
    // The caller found no file; the data dir's lock keeps a second gateway
    // of this data dir from racing us here. (Gateways of different data
    // dirs that share one callback secret file must be given it made: two
    // making it at once would race here.)
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// The salted hash of a credential (`None`: anonymous). The two cases are
/// domain-separated so no header value hashes like "no header".
pub fn credential_hash(salt: &[u8; 32], credential: Option<&[u8]>) -> LaneKey {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(salt).expect("HMAC takes any key length");
    match credential {
        None => mac.update(&[0]),
        Some(c) => {
            mac.update(&[1]);
            mac.update(c);
        }
    }
    mac.finalize().into_bytes().into()
}

pub fn same_owner(a: &LaneKey, b: &LaneKey) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trips_only_for_the_same_id() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::load_or_create(&dir.path().join("k"), false).unwrap();
        let id = RequestId::generate();
        let sealed = s.seal(&id, b"Bearer secret").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(s.unseal(&id, &sealed).unwrap(), b"Bearer secret");
        assert!(s.unseal(&RequestId::generate(), &sealed).is_err());
        for credential in [None, Some(&b""[..]), Some(&b"Bearer x"[..])] {
            let sealed = s.seal_credential(&id, credential).unwrap();
            assert_eq!(
                s.unseal_credential(&id, &sealed).unwrap().as_deref(),
                credential
            );
        }
    }

    #[test]
    fn key_is_kept_with_mode_0600_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let a = Sealer::load_or_create(&path, false).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Sealer::load_or_create(&path, true).unwrap();
        let id = RequestId::generate();
        assert_eq!(b.unseal(&id, &a.seal(&id, b"x").unwrap()).unwrap(), b"x");
    }

    #[test]
    fn a_key_cut_short_by_an_earlier_crash_is_never_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        // A crash while writing left only the temporary file behind.
        fs::write(dir.path().join("k.new"), b"partial").unwrap();
        Sealer::load_or_create(&path, false).unwrap();
        assert_eq!(fs::read(&path).unwrap().len(), 32);
        assert!(!dir.path().join("k.new").exists());
    }

    #[test]
    fn missing_key_with_sealed_credentials_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = Sealer::load_or_create(&dir.path().join("k"), true);
        assert!(matches!(e, Err(CryptoError::KeyMissing(_))));
    }

    #[test]
    fn the_start_up_check_tells_a_wrong_key_file_from_the_right_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let right = Sealer::load_or_create(&path, false).unwrap();
        let id = RequestId::generate();
        let sealed = right.seal_credential(&id, Some(b"Bearer x")).unwrap();
        right.check(&id, &sealed).unwrap();
        let anonymous = right.seal_credential(&id, None).unwrap();
        right.check(&id, &anonymous).unwrap();

        fs::write(&path, [7u8; 32]).unwrap();
        let wrong = Sealer::load_or_create(&path, true).unwrap();
        let e = wrong.check(&id, &sealed).unwrap_err();
        assert!(matches!(e, CryptoError::WrongKey(..)), "{e:?}");
        let message = e.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("not the key"), "{message}");
    }

    #[test]
    fn hashes_are_exact_and_salted() {
        let salt = [1u8; 32];
        let a = credential_hash(&salt, Some(b"Bearer x"));
        assert!(same_owner(&a, &credential_hash(&salt, Some(b"Bearer x"))));
        assert!(!same_owner(&a, &credential_hash(&salt, Some(b"bearer x"))));
        assert!(!same_owner(
            &a,
            &credential_hash(&[2u8; 32], Some(b"Bearer x"))
        ));
        assert!(!same_owner(
            &credential_hash(&salt, None),
            &credential_hash(&salt, Some(b""))
        ));
    }
}
