//! Encryption at rest for the audit ledger (`audit.encryption_key`).
//!
//! Each record is sealed with AES-256-GCM under a *data key*; data keys are random, one per
//! start of the gateway, and kept in `ledger/datakeys/<id>.key` wrapped (AES-256-GCM) by the
//! *master key* from the file the config names. A sealed payload is
//! `0x01 | data key id (u32 BE) | nonce (12) | ciphertext and tag`, with the record's sequence
//! number as associated data, so a sealed record cannot be moved to another place. The Merkle
//! leaves and the chain hash the sealed bytes: `audit verify` needs no key; reading events
//! (`search`, `export`, `access review`) does.
//!
//! Nonces: a random 4-byte prefix per data key and the record's sequence number; a data key
//! is never used by two processes, and its prefix differs for every key, so no (key, nonce)
//! pair repeats even when a torn record's number is used again after a crash.
//!
//! Rotation: a restart begins a new data key; `rewrap` wraps every data key under a new
//! master key (the old one can then be destroyed).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The first byte of a sealed payload (an event's JSON starts with `{`).
pub const SEALED: u8 = 0x01;
const HEADER: usize = 1 + 4 + 12;

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error("the ledger's data keys in {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("data key {0} cannot be unwrapped: the master key (audit.encryption_key) is not the one it was made with")]
    WrongMaster(String),
    #[error("record {seq} is sealed with data key {id:08x}, which is not in ledger/datakeys")]
    UnknownKey { seq: u64, id: u32 },
    #[error("record {0} does not open: it was altered, or sealed under another key")]
    BadRecord(u64),
    #[error("record {0} is encrypted: set audit.encryption_key to read it")]
    NoKey(u64),
    #[error("the encryption key {0}: {1}; it must be 32 bytes, raw or as 64 hex digits")]
    BadMaster(String, String),
    #[error("the system random number generator failed")]
    Random,
    #[error("{0}")]
    Ledger(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CryptError + '_ {
    move |error| CryptError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn aes(key: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES key"))
}

/// A master key from its file: 32 raw bytes, or 64 hex digits (a trailing newline ignored).
pub fn master_key(bytes: &[u8], shown: &str) -> Result<[u8; 32], CryptError> {
    let trimmed: &[u8] = bytes.trim_ascii_end();
    if trimmed.len() == 64 && trimmed.iter().all(u8::is_ascii_hexdigit) {
        let mut out = [0u8; 32];
        for (i, pair) in trimmed.chunks(2).enumerate() {
            let s = std::str::from_utf8(pair).unwrap_or("00");
            out[i] = u8::from_str_radix(s, 16).unwrap_or(0);
        }
        return Ok(out);
    }
    bytes
        .try_into()
        .map_err(|_| CryptError::BadMaster(shown.to_string(), format!("{} bytes", bytes.len())))
}

/// The master key from where `audit.encryption_key` says (raw bytes: no trimming beyond
/// what [`master_key`] allows for hex).
pub fn master_from(source: &apiwarden_core::config::SecretSource) -> Result<[u8; 32], CryptError> {
    use apiwarden_core::config::SecretSource;
    match source {
        SecretSource::Env(n) => {
            let v = std::env::var_os(n)
                .ok_or_else(|| CryptError::BadMaster(format!("env:{n}"), "not set".into()))?;
            master_key(&v.into_encoded_bytes(), &format!("env:{n}"))
        }
        SecretSource::File(p) | SecretSource::Generated(p) => {
            let bytes = std::fs::read(p).map_err(io(p))?;
            master_key(&bytes, &format!("file:{}", p.display()))
        }
    }
}

fn random<const N: usize>() -> Result<[u8; N], CryptError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| CryptError::Random)?;
    Ok(b)
}

/// Seals records under one data key.
pub struct Sealer {
    id: u32,
    key: LessSafeKey,
    prefix: [u8; 4],
}

impl Sealer {
    /// Makes a new data key, wraps it under `master` into `datakeys/<id>.key` (file name: id
    /// in hex; contents: nonce prefix (4), wrap nonce (12), wrapped key and tag (48)).
    pub fn new_data_key(dir: &Path, master: &[u8; 32]) -> Result<Sealer, CryptError> {
        let keys = dir.join("datakeys");
        crate::ledger::private_dir(&keys).map_err(io(&keys))?;
        let data: [u8; 32] = random()?;
        let prefix: [u8; 4] = random()?;
        let id = loop {
            let id = u32::from_be_bytes(random()?);
            if !keys.join(format!("{id:08x}.key")).exists() {
                break id;
            }
        };
        let wrap_nonce: [u8; 12] = random()?;
        let mut wrapped = data.to_vec();
        aes(master)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(wrap_nonce),
                Aad::from(id.to_be_bytes()),
                &mut wrapped,
            )
            .map_err(|_| CryptError::Random)?;
        let mut file = prefix.to_vec();
        file.extend_from_slice(&wrap_nonce);
        file.extend_from_slice(&wrapped);
        let path = keys.join(format!("{id:08x}.key"));
        write_new(&path, &file).map_err(io(&path))?;
        // The key file must outlive the records sealed under it (`strict` syncs those).
        sync_dir(&keys).map_err(io(&keys))?;
        Ok(Sealer {
            id,
            key: aes(&data),
            prefix,
        })
    }

    /// Appends the sealed form of record `seq` to `out`.
    pub fn seal(&self, seq: u64, plain: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&self.prefix);
        nonce[4..].copy_from_slice(&seq.to_be_bytes());
        out.push(SEALED);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plain);
        let mut body = out.split_off(start);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(seq.to_le_bytes()),
                &mut body,
            )
            .expect("AES-GCM seals any record under 64 GiB");
        out.extend_from_slice(&body);
    }
}

/// Writes a new private file (never replacing one).
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A data key file: its id and contents.
fn data_key_files(dir: &Path) -> Result<Vec<(u32, PathBuf, Vec<u8>)>, CryptError> {
    let keys = dir.join("datakeys");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&keys) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(&keys)(e)),
    };
    for e in entries {
        let path = e.map_err(io(&keys))?.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".key"))
            .and_then(|n| u32::from_str_radix(n, 16).ok())
        else {
            continue;
        };
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        out.push((id, path, bytes));
    }
    Ok(out)
}

fn unwrap(id: u32, path: &Path, file: &[u8], master: &[u8; 32]) -> Result<Vec<u8>, CryptError> {
    let wrong = || CryptError::WrongMaster(path.display().to_string());
    if file.len() != 4 + 12 + 48 {
        return Err(wrong());
    }
    let nonce: [u8; 12] = file[4..16].try_into().expect("12 bytes");
    let mut wrapped = file[16..].to_vec();
    let plain = aes(master)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(id.to_be_bytes()),
            &mut wrapped,
        )
        .map_err(|_| wrong())?;
    Ok(plain.to_vec())
}

/// Opens sealed records: every data key of the ledger, unwrapped.
pub struct Opener {
    keys: HashMap<u32, LessSafeKey>,
    index_key: crate::ledger_index::IndexKey,
}

impl Opener {
    pub fn load(dir: &Path, master: &[u8; 32]) -> Result<Opener, CryptError> {
        let mut keys = HashMap::new();
        for (id, path, file) in data_key_files(dir)? {
            keys.insert(id, aes(&unwrap(id, &path, &file, master)?));
        }
        Ok(Opener {
            keys,
            index_key: crate::ledger_index::IndexKey::from_master(master),
        })
    }

    /// The key of the search index's hashes (derived from the master key).
    pub fn index_key(&self) -> crate::ledger_index::IndexKey {
        self.index_key
    }

    /// The plaintext of record `seq`'s payload (as is when it was not sealed).
    pub fn open(&self, seq: u64, payload: &[u8]) -> Result<Vec<u8>, CryptError> {
        open_with(Some(self), seq, payload)
    }
}

/// The plaintext of a payload: unsealed as is; sealed with `opener`, or an error without one.
pub fn open_with(opener: Option<&Opener>, seq: u64, payload: &[u8]) -> Result<Vec<u8>, CryptError> {
    if payload.first() != Some(&SEALED) {
        return Ok(payload.to_vec());
    }
    let Some(opener) = opener else {
        return Err(CryptError::NoKey(seq));
    };
    if payload.len() < HEADER + 16 {
        return Err(CryptError::BadRecord(seq));
    }
    let id = u32::from_be_bytes(payload[1..5].try_into().expect("4 bytes"));
    let key = opener
        .keys
        .get(&id)
        .ok_or(CryptError::UnknownKey { seq, id })?;
    let nonce: [u8; 12] = payload[5..17].try_into().expect("12 bytes");
    let mut body = payload[HEADER..].to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(seq.to_le_bytes()),
            &mut body,
        )
        .map_err(|_| CryptError::BadRecord(seq))?;
    Ok(plain.to_vec())
}

/// Wraps every data key under `new` instead of `old` (master key rotation); the number of
/// keys rewrapped. Each file is replaced atomically and the directory synced; a key that
/// unwraps under neither key stops the rotation before anything is changed. A key already
/// under `new` (a rotation cut off half-way, run again) is left as it is.
pub fn rewrap(dir: &Path, old: &[u8; 32], new: &[u8; 32]) -> Result<usize, CryptError> {
    // A gateway writing the ledger may make a new data key under the old master key meanwhile.
    let _lock = match dir.exists() {
        true => Some(
            crate::ledger::DirLock::take(dir, crate::ledger::LOCK_WAIT)
                .map_err(|e| CryptError::Ledger(e.to_string()))?,
        ),
        false => None,
    };
    let files = data_key_files(dir)?;
    let mut plain = Vec::new();
    for (id, path, file) in &files {
        match unwrap(*id, path, file, old) {
            Ok(key) => plain.push((*id, path.clone(), file[..4].to_vec(), key)),
            Err(e) => {
                if unwrap(*id, path, file, new).is_err() {
                    return Err(e);
                }
            }
        }
    }
    for (id, path, prefix, data) in &plain {
        let wrap_nonce: [u8; 12] = random()?;
        let mut wrapped = data.clone();
        aes(new)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(wrap_nonce),
                Aad::from(id.to_be_bytes()),
                &mut wrapped,
            )
            .map_err(|_| CryptError::Random)?;
        let mut file = prefix.clone();
        file.extend_from_slice(&wrap_nonce);
        file.extend_from_slice(&wrapped);
        let tmp = path.with_extension("rewrap");
        let _ = std::fs::remove_file(&tmp);
        write_new(&tmp, &file).map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
    }
    let keys = dir.join("datakeys");
    if keys.exists() {
        sync_dir(&keys).map_err(io(&keys))?;
    }
    Ok(plain.len())
}

/// Makes the directory's entries (a new or renamed file) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
