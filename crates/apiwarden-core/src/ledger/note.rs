//! Checkpoints as C2SP signed notes (<https://c2sp.org/signed-note>,
//! <https://c2sp.org/tlog-checkpoint>), signed with Ed25519.
//!
//! ```text
//! apiwarden.example/node-1                      origin
//! 1048576                                       tree size
//! CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=  root hash, standard base64
//!                                               blank line
//! — apiwarden.example/node-1 Az3grlgt…          one line per signature
//! ```
//!
//! - The signed text is the body up to and including its last newline; the blank line and the
//!   signature lines are not signed.
//! - A signature line is an em dash (U+2014), a space, the key name, a space, and
//!   `base64(key id (4 bytes, big-endian) || Ed25519 signature (64 bytes))`.
//! - The key id is the first four bytes of `SHA-256(key name || 0x0A || 0x01 || public key)`
//!   ([`key_id`]); `0x01` is the signature type of Ed25519.
//! - A verifier key is written `<name>+<key id, 8 hex digits>+<base64(0x01 || public key)>`, the
//!   "vkey" form of Go's `golang.org/x/mod/sumdb/note`, so auditors can use its tools too.
//!
//! Verification follows the spec: signatures by keys the caller does not trust are ignored
//! (that is how old and new keys coexist through a rotation, and how witnesses cosign), any
//! signature by a trusted key must verify or the whole note is refused, and at least one must
//! be present. Extension lines after the root (tlog-checkpoint allows them, e.g. the time of an
//! idle checkpoint) are signed like the rest and returned in [`Checkpoint::extensions`].
//!
//! This module does no I/O and draws no randomness: the signing key's 32-byte seed is passed in.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use super::merkle::Hash;

/// The signature type byte of Ed25519 in key ids and key encodings.
const ALG_ED25519: u8 = 0x01;
/// The start of a signature line: em dash and space.
const SIG_PREFIX: &str = "\u{2014} ";
/// Most signature lines a note may carry (the limit of Go's reference implementation; the spec
/// asks for at least 16).
pub const MAX_SIGNATURES: usize = 100;

/// A tree head of the ledger: who issued it, how many records, and their Merkle root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's identity, e.g. `apiwarden.example/node-1`: non-empty, no control characters.
    pub origin: String,
    /// The number of records (leaves) the root covers.
    pub size: u64,
    /// The RFC 6962 Merkle tree head of the first `size` records.
    pub root: Hash,
    /// Extension lines after the root (each non-empty, no control characters), e.g. the time
    /// of the checkpoint, so that idle checkpoints of the same tree still differ. Usually none.
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The note text: `"<origin>\n<size>\n<base64 root>\n"`, then one line per extension.
    pub fn body(&self) -> String {
        let mut body = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        );
        for line in &self.extensions {
            body.push_str(line);
            body.push('\n');
        }
        body
    }

    /// Whether [`Checkpoint::body`] is a valid checkpoint text: a non-empty origin, non-empty
    /// extension lines, no control characters.
    pub fn check(&self) -> Result<(), NoteError> {
        check_origin(&self.origin).map_err(NoteError::InvalidCheckpoint)?;
        for line in &self.extensions {
            check_extension(line).map_err(NoteError::InvalidCheckpoint)?;
        }
        Ok(())
    }

    /// Parses a note text as a checkpoint: the lines [`Checkpoint::body`] writes.
    pub fn from_body(text: &str) -> Result<Checkpoint, NoteError> {
        let bad = |why: String| Err(NoteError::InvalidCheckpoint(why));
        let Some(text) = text.strip_suffix('\n') else {
            return bad("the text does not end with a newline".into());
        };
        let lines: Vec<&str> = text.split('\n').collect();
        if lines.len() < 3 {
            return bad(format!(
                "it has {} lines where a checkpoint has three (origin, tree size, root hash)",
                lines.len()
            ));
        }
        for line in &lines[3..] {
            if let Err(why) = check_extension(line) {
                return bad(why);
            }
        }
        let origin = lines[0];
        if let Err(why) = check_origin(origin) {
            return bad(why);
        }
        let size_line = lines[1];
        let canonical = !size_line.is_empty()
            && size_line.bytes().all(|b| b.is_ascii_digit())
            && (size_line == "0" || !size_line.starts_with('0'));
        let size = match size_line.parse::<u64>() {
            Ok(size) if canonical => size,
            _ => {
                return bad(format!(
                    "the tree size {size_line:?} is not a decimal number without leading zeros"
                ))
            }
        };
        let root = match B64.decode(lines[2]).ok().map(<Hash>::try_from) {
            Some(Ok(root)) if B64.encode(root) == lines[2] => root,
            _ => {
                return bad(format!(
                    "the root hash {:?} is not 32 bytes in standard base64",
                    lines[2]
                ))
            }
        };
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
            extensions: lines[3..].iter().map(|l| l.to_string()).collect(),
        })
    }
}

fn check_origin(origin: &str) -> Result<(), String> {
    if origin.is_empty() {
        return Err("the origin (first line) is empty".into());
    }
    if origin.chars().any(|c| c.is_control()) {
        return Err(format!(
            "the origin {origin:?} contains a control character"
        ));
    }
    Ok(())
}

fn check_extension(line: &str) -> Result<(), String> {
    if line.is_empty() {
        return Err("an extension line is empty".into());
    }
    if line.chars().any(|c| c.is_control()) {
        return Err(format!(
            "the extension line {line:?} contains a control character"
        ));
    }
    Ok(())
}

/// Why a note, a key or a checkpoint was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// A key name is empty or has a space or a `+`.
    #[error("invalid key name {0:?}: it must be non-empty, without spaces or '+' (e.g. \"apiwarden.example/node-1\")")]
    InvalidKeyName(String),
    /// A verifier key is not `<name>+<8 hex digits>+<base64(0x01 || 32-byte Ed25519 key)>`.
    #[error("invalid verifier key: {0}; expected <name>+<key id, 8 hex digits>+<base64 of 0x01 and the 32-byte Ed25519 public key>, as `apiwarden audit public-key` prints it")]
    InvalidVerifierKey(String),
    /// A signing key is not `PRIVATE+KEY+<name>+<8 hex digits>+<base64(0x01 || 32-byte seed)>`.
    #[error("invalid signing key: {0}; expected PRIVATE+KEY+<name>+<key id>+<base64 of 0x01 and the 32-byte Ed25519 seed>")]
    InvalidSigningKey(String),
    /// The note is not a signed note at all: no blank line before the signatures, a malformed
    /// signature line, a control character, too many signatures.
    #[error("malformed signed note: {0}")]
    Malformed(String),
    /// The signed text is not a checkpoint.
    #[error("the note is not a valid checkpoint: {0}")]
    InvalidCheckpoint(String),
    /// No signature line is from a trusted key.
    #[error("the note is not signed by any trusted key: it is signed by {}; trusted: {}. Give the verifier key of the log that wrote it (after a key rotation, the old and the new key)", list_or_none(.found), list_or_none(.trusted))]
    UnknownKey {
        /// `name+keyid` of every signature line in the note.
        found: Vec<String>,
        /// `name+keyid` of every key the caller trusts.
        trusted: Vec<String>,
    },
    /// A signature from a trusted key does not verify: the text or the signature was altered.
    #[error("the signature by trusted key {key} does not verify: the checkpoint or its signature was altered, or it was signed by a different key with the same name and id")]
    BadSignature {
        /// `name+keyid` of the key.
        key: String,
    },
}

fn list_or_none(list: &[String]) -> String {
    if list.is_empty() {
        "no key".to_string()
    } else {
        list.join(", ")
    }
}

/// Key names are non-empty and have no Unicode spaces and no `+` (signed-note spec).
fn check_key_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty()
        || name.contains('+')
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(NoteError::InvalidKeyName(name.to_string()));
    }
    Ok(())
}

/// The key id of an Ed25519 key: the first four bytes (big-endian) of
/// `SHA-256(name || 0x0A || 0x01 || public key)`.
pub fn key_id(name: &str, public_key: &[u8; 32]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ALG_ED25519]);
    h.update(public_key);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

fn key_label(name: &str, id: u32) -> String {
    format!("{name}+{id:08x}")
}

/// Splits `<name>+<8 hex digits>+<base64>` and checks the name and the id's form.
fn split_key(text: &str) -> Result<(&str, u32, Vec<u8>), String> {
    let mut parts = text.splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("it does not have three parts separated by '+'".into());
    };
    check_key_name(name).map_err(|e| e.to_string())?;
    if id.len() != 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("the key id {id:?} is not 8 hex digits"));
    }
    let id = u32::from_str_radix(id, 16).map_err(|e| e.to_string())?;
    let key = B64
        .decode(key)
        .map_err(|_| "the key is not standard base64".to_string())?;
    Ok((name, id, key))
}

/// A key that signs checkpoints: a key name and an Ed25519 key.
///
/// Its `Debug` output shows the name and key id, never the secret.
pub struct NoteSigner {
    name: String,
    id: u32,
    key: SigningKey,
}

impl fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoteSigner")
            .field("key", &key_label(&self.name, self.id))
            .finish_non_exhaustive()
    }
}

impl NoteSigner {
    /// A signer named `name` (which should be the checkpoints' origin) with the Ed25519 key whose
    /// 32-byte seed (RFC 8032 private key) is `secret_key`. The caller generates the seed from a
    /// secure random source and keeps it.
    pub fn new(name: &str, secret_key: [u8; 32]) -> Result<NoteSigner, NoteError> {
        check_key_name(name)?;
        let key = SigningKey::from_bytes(&secret_key);
        let id = key_id(name, key.verifying_key().as_bytes());
        Ok(NoteSigner {
            name: name.to_string(),
            id,
            key,
        })
    }

    /// Reads a signing key in the form of Go's `note.NewSigner`:
    /// `PRIVATE+KEY+<name>+<key id>+<base64(0x01 || seed)>`. The key id must match.
    pub fn from_skey(skey: &str) -> Result<NoteSigner, NoteError> {
        let bad = |why: &str| NoteError::InvalidSigningKey(why.to_string());
        let rest = skey
            .trim_end()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or_else(|| bad("it does not start with PRIVATE+KEY+"))?;
        let (name, id, key) = split_key(rest).map_err(|why| bad(&why))?;
        let [ALG_ED25519, seed @ ..] = key.as_slice() else {
            return Err(bad("the key is not an Ed25519 key (type byte 0x01)"));
        };
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| bad("the Ed25519 seed is not 32 bytes"))?;
        let signer = NoteSigner::new(name, seed)?;
        if signer.id != id {
            return Err(bad("the key id does not match the name and key"));
        }
        Ok(signer)
    }

    /// The signing key in the form [`NoteSigner::from_skey`] reads. It holds the secret: write it
    /// only to a file readable by its owner.
    pub fn skey(&self) -> String {
        let mut key = Vec::with_capacity(33);
        key.push(ALG_ED25519);
        key.extend_from_slice(self.key.as_bytes());
        format!(
            "PRIVATE+KEY+{}+{}",
            key_label(&self.name, self.id),
            B64.encode(key)
        )
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id (see [`key_id`]).
    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// The Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The public key in the vkey form an auditor passes to [`Verifier::parse`]:
    /// `<name>+<key id>+<base64(0x01 || public key)>`.
    pub fn verifier_key(&self) -> String {
        vkey(&self.name, self.id, &self.public_key())
    }

    /// The [`Verifier`] of this key.
    pub fn verifier(&self) -> Verifier {
        Verifier {
            name: self.name.clone(),
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// The whole signed note of `checkpoint`: its body, a blank line, this key's signature line.
    /// Fails only when the checkpoint is not valid (see [`Checkpoint::check`]).
    pub fn sign(&self, checkpoint: &Checkpoint) -> Result<String, NoteError> {
        checkpoint.check()?;
        sign_text(&checkpoint.body(), &[self])
    }

    /// The signature line of this key over `text` (with its newline).
    fn signature_line(&self, text: &str) -> String {
        let sig: Signature = self.key.sign(text.as_bytes());
        let mut raw = Vec::with_capacity(68);
        raw.extend_from_slice(&self.id.to_be_bytes());
        raw.extend_from_slice(&sig.to_bytes());
        format!("{SIG_PREFIX}{} {}\n", self.name, B64.encode(raw))
    }
}

/// Signs the note text `text` (non-empty, ending in a newline, no blank line at its end, no
/// control characters but newlines) with every signer in turn: one signature line each, e.g.
/// the old and the new key during a rotation. Use [`Checkpoint::body`] for a checkpoint.
pub fn sign_text(text: &str, signers: &[&NoteSigner]) -> Result<String, NoteError> {
    if text.is_empty() || !text.ends_with('\n') {
        return Err(NoteError::Malformed(
            "the text to sign must be non-empty and end with a newline".into(),
        ));
    }
    if text.ends_with("\n\n") || text == "\n" {
        return Err(NoteError::Malformed(
            "the text to sign must not end with a blank line: it would be read as the signature separator".into(),
        ));
    }
    if text.chars().any(|c| c != '\n' && (c as u32) < 0x20) {
        return Err(NoteError::Malformed(
            "the text to sign contains a control character".into(),
        ));
    }
    if signers.is_empty() || signers.len() > MAX_SIGNATURES {
        return Err(NoteError::Malformed(format!(
            "a note needs between 1 and {MAX_SIGNATURES} signatures, not {}",
            signers.len()
        )));
    }
    let mut note = String::with_capacity(text.len() + 1 + signers.len() * 120);
    note.push_str(text);
    note.push('\n');
    for signer in signers {
        note.push_str(&signer.signature_line(text));
    }
    Ok(note)
}

fn vkey(name: &str, id: u32, public_key: &[u8; 32]) -> String {
    let mut key = Vec::with_capacity(33);
    key.push(ALG_ED25519);
    key.extend_from_slice(public_key);
    format!("{}+{}", key_label(name, id), B64.encode(key))
}

/// A trusted public key: a key name, its key id and an Ed25519 public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl Verifier {
    /// Parses a verifier key `<name>+<key id>+<base64(0x01 || public key)>`. Refuses a key id
    /// that does not match the name and key, a key type other than Ed25519, and a public key
    /// that is not a valid Ed25519 point.
    pub fn parse(vkey: &str) -> Result<Verifier, NoteError> {
        let bad = |why: &str| NoteError::InvalidVerifierKey(why.to_string());
        let (name, id, key) = split_key(vkey.trim_end()).map_err(|why| bad(&why))?;
        let [ALG_ED25519, public @ ..] = key.as_slice() else {
            return Err(bad("the key is not an Ed25519 key (type byte 0x01)"));
        };
        let public: [u8; 32] = public
            .try_into()
            .map_err(|_| bad("the Ed25519 public key is not 32 bytes"))?;
        if key_id(name, &public) != id {
            return Err(bad(
                "the key id does not match the name and key (altered or mistyped)",
            ));
        }
        let key = VerifyingKey::from_bytes(&public)
            .map_err(|_| bad("the public key is not a valid Ed25519 point"))?;
        if key.is_weak() {
            return Err(bad("the public key is a weak (small-order) Ed25519 point"));
        }
        Ok(Verifier {
            name: name.to_string(),
            id,
            key,
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id.
    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// The Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The vkey form [`Verifier::parse`] reads.
    pub fn verifier_key(&self) -> String {
        vkey(&self.name, self.id, self.key.as_bytes())
    }
}

/// A note whose signatures checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedNote<'a> {
    /// The signed text, ending in a newline.
    pub text: &'a str,
    /// Indices into the caller's verifiers of the keys whose signatures verified (at least one).
    pub signed_by: Vec<usize>,
}

/// Opens a signed note of any content: checks its form and the signatures by the keys in
/// `verifiers` (see the module documentation for the rules). Use [`verify`] for checkpoints.
pub fn verify_note<'a>(
    note: &'a str,
    verifiers: &[Verifier],
) -> Result<VerifiedNote<'a>, NoteError> {
    let malformed = |why: &str| Err(NoteError::Malformed(why.to_string()));
    if note.chars().any(|c| c != '\n' && (c as u32) < 0x20) {
        return malformed("it contains a control character other than newline");
    }
    // The text ends at the last blank line.
    let Some(split) = note.rfind("\n\n") else {
        return malformed("there is no blank line between the text and the signatures");
    };
    let text = &note[..split + 1];
    let sigs = &note[split + 2..];
    if sigs.is_empty() {
        return malformed("there is no signature line after the blank line");
    }
    let Some(sigs) = sigs.strip_suffix('\n') else {
        return malformed("the last signature line does not end with a newline");
    };
    let lines: Vec<&str> = sigs.split('\n').collect();
    if lines.len() > MAX_SIGNATURES {
        return Err(NoteError::Malformed(format!(
            "it has {} signature lines, more than the {MAX_SIGNATURES} accepted",
            lines.len()
        )));
    }
    let mut found = Vec::with_capacity(lines.len());
    let mut signed_by = Vec::new();
    for line in lines {
        let Some(rest) = line.strip_prefix(SIG_PREFIX) else {
            return Err(NoteError::Malformed(format!(
                "the line {line:?} is not a signature line (\u{2014} <key name> <base64 signature>)"
            )));
        };
        let Some((name, b64)) = rest.split_once(' ') else {
            return Err(NoteError::Malformed(format!(
                "the signature line {line:?} has no space between the key name and the signature"
            )));
        };
        if check_key_name(name).is_err() {
            return Err(NoteError::Malformed(format!(
                "the signature line {line:?} has an invalid key name"
            )));
        }
        let raw = match B64.decode(b64) {
            Ok(raw) if raw.len() >= 5 => raw,
            _ => {
                return Err(NoteError::Malformed(format!(
                    "the signature of {name:?} is not base64 of a key id and a signature"
                )))
            }
        };
        let id = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        found.push(key_label(name, id));
        // Unknown keys are ignored, even if they share the name or the id with a known one.
        let Some((index, verifier)) = verifiers
            .iter()
            .enumerate()
            .find(|(_, v)| v.id == id && v.name == name)
        else {
            continue;
        };
        let good = <[u8; 64]>::try_from(&raw[4..])
            .map(|sig| Signature::from_bytes(&sig))
            .is_ok_and(|sig| verifier.key.verify_strict(text.as_bytes(), &sig).is_ok());
        if !good {
            return Err(NoteError::BadSignature {
                key: key_label(name, id),
            });
        }
        if !signed_by.contains(&index) {
            signed_by.push(index);
        }
    }
    if signed_by.is_empty() {
        return Err(NoteError::UnknownKey {
            found,
            trusted: verifiers.iter().map(|v| key_label(&v.name, v.id)).collect(),
        });
    }
    Ok(VerifiedNote { text, signed_by })
}

/// Verifies a signed checkpoint: the note's form, the signatures by the trusted `verifiers`
/// (at least one, and every one present must verify), and the body as a checkpoint.
///
/// The signature is checked before the body is read, so nothing untrusted is parsed for
/// meaning. The caller still decides whether the origin is the log it expects.
pub fn verify(note: &str, verifiers: &[Verifier]) -> Result<Checkpoint, NoteError> {
    let verified = verify_note(note, verifiers)?;
    Checkpoint::from_body(verified.text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            origin: "apiwarden.example/node-1".into(),
            size: 1_048_576,
            root: super::super::merkle::leaf_hash(b"r"),
            extensions: vec![],
        }
    }

    fn signer(seed: u8) -> NoteSigner {
        NoteSigner::new("apiwarden.example/node-1", [seed; 32]).unwrap()
    }

    // The example of Go's reference implementation (golang.org/x/mod/sumdb/note, note_test.go
    // and the package documentation), the one C2SP's signed-note spec was written from.
    const PETER_SKEY: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const PETER_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                              then you don't know what your problem is.\n";
    const PETER_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn known_answer_go_sumdb_note() {
        let signer = NoteSigner::from_skey(PETER_SKEY).unwrap();
        assert_eq!(signer.key_id(), 0xc74f20a3);
        assert_eq!(signer.verifier_key(), PETER_VKEY);
        assert_eq!(signer.skey(), PETER_SKEY);
        let note = sign_text(PETER_TEXT, &[&signer]).unwrap();
        assert_eq!(note, format!("{PETER_TEXT}\n{PETER_SIG}"));
        let v = Verifier::parse(PETER_VKEY).unwrap();
        assert_eq!(v.name(), "PeterNeumann");
        assert_eq!(v.public_key(), signer.public_key());
        let opened = verify_note(&note, &[v]).unwrap();
        assert_eq!(opened.text, PETER_TEXT);
        assert_eq!(opened.signed_by, vec![0]);
        // It is a signed note but not a checkpoint.
        assert!(matches!(
            verify(&note, &[Verifier::parse(PETER_VKEY).unwrap()]),
            Err(NoteError::InvalidCheckpoint(_))
        ));
    }

    #[test]
    fn checkpoint_body_format() {
        let mut cp = checkpoint();
        cp.root = [0; 32];
        assert_eq!(
            cp.body(),
            "apiwarden.example/node-1\n1048576\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
        );
        assert_eq!(Checkpoint::from_body(&cp.body()), Ok(cp));
        // The example of c2sp.org/tlog-checkpoint parses.
        let spec =
            "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n";
        let parsed = Checkpoint::from_body(spec).unwrap();
        assert_eq!(parsed.size, 20852163);
        assert_eq!(parsed.body(), spec);
    }

    #[test]
    fn extension_lines_are_signed_and_returned() {
        let s = signer(1);
        let cp = Checkpoint {
            extensions: vec!["time 2026-01-01T00:00:00Z".into()],
            ..checkpoint()
        };
        let note = s.sign(&cp).unwrap();
        assert!(note.starts_with(&format!(
            "{}time 2026-01-01T00:00:00Z\n\n",
            checkpoint().body()
        )));
        assert_eq!(verify(&note, &[s.verifier()]), Ok(cp));
        let moved = note.replacen("T00:00:00Z", "T00:00:01Z", 1);
        assert!(matches!(
            verify(&moved, &[s.verifier()]),
            Err(NoteError::BadSignature { .. })
        ));
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let s = signer(1);
        let note = s.sign(&checkpoint()).unwrap();
        assert!(note.starts_with(&checkpoint().body()));
        let sig_line = note.lines().last().unwrap();
        assert!(sig_line.starts_with("\u{2014} apiwarden.example/node-1 "));
        let raw = B64.decode(sig_line.rsplit(' ').next().unwrap()).unwrap();
        assert_eq!(raw.len(), 68);
        assert_eq!(&raw[..4], &s.key_id().to_be_bytes());
        let v = Verifier::parse(&s.verifier_key()).unwrap();
        assert_eq!(v, s.verifier());
        assert_eq!(verify(&note, &[v]), Ok(checkpoint()));
        assert_eq!(
            NoteSigner::from_skey(&s.skey()).unwrap().verifier_key(),
            s.verifier_key()
        );
        assert!(!format!("{s:?}").contains(&B64.encode([1u8; 32])));
    }

    #[test]
    fn key_id_is_sha256_of_name_newline_type_key() {
        let s = signer(2);
        let mut input = b"apiwarden.example/node-1\n\x01".to_vec();
        input.extend_from_slice(&s.public_key());
        let d = Sha256::digest(&input);
        assert_eq!(s.key_id().to_be_bytes(), d[..4]);
    }

    #[test]
    fn key_rotation_old_and_new_keys_both_verify() {
        let (old, new) = (signer(1), signer(2));
        let note = sign_text(&checkpoint().body(), &[&old, &new]).unwrap();
        assert_eq!(note.matches('\u{2014}').count(), 2);
        for trusted in [
            vec![old.verifier()],
            vec![new.verifier()],
            vec![old.verifier(), new.verifier()],
            vec![signer(3).verifier(), new.verifier()],
        ] {
            assert_eq!(verify(&note, &trusted), Ok(checkpoint()), "{trusted:?}");
        }
        let opened = verify_note(&note, &[new.verifier(), old.verifier()]).unwrap();
        assert_eq!(opened.signed_by, vec![1, 0]);
    }

    #[test]
    fn unknown_key_is_refused() {
        let note = signer(1).sign(&checkpoint()).unwrap();
        let err = verify(&note, &[signer(2).verifier()]).unwrap_err();
        assert!(matches!(err, NoteError::UnknownKey { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "apiwarden.example/node-1+{:08x}",
                signer(1).key_id()
            )),
            "{msg}"
        );
        assert!(matches!(
            verify(&note, &[]),
            Err(NoteError::UnknownKey { .. })
        ));
        // Same key, other name: a different key id, so unknown rather than a bad signature.
        let renamed = NoteSigner::new("other.example/log", [1; 32]).unwrap();
        assert!(matches!(
            verify(&note, &[renamed.verifier()]),
            Err(NoteError::UnknownKey { .. })
        ));
    }

    #[test]
    fn tampered_body_is_a_bad_signature() {
        let s = signer(1);
        let note = s.sign(&checkpoint()).unwrap();
        let tampered = note.replacen("1048576", "1048577", 1);
        assert_eq!(
            verify(&tampered, &[s.verifier()]),
            Err(NoteError::BadSignature {
                key: format!("apiwarden.example/node-1+{:08x}", s.key_id())
            })
        );
        // Every change of one character of the body is refused.
        let body_len = checkpoint().body().len();
        for i in 0..body_len {
            let mut bytes = note.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let Ok(text) = String::from_utf8(bytes) else {
                continue;
            };
            assert!(verify(&text, &[s.verifier()]).is_err(), "byte {i}");
        }
    }

    #[test]
    fn tampered_signature_is_a_bad_signature() {
        let s = signer(1);
        let note = s.sign(&checkpoint()).unwrap();
        let (head, line) = note.trim_end().rsplit_once(' ').unwrap();
        let mut raw = B64.decode(line).unwrap();
        for i in 4..raw.len() {
            raw[i] ^= 1;
            let forged = format!("{head} {}\n", B64.encode(&raw));
            assert!(
                matches!(
                    verify(&forged, &[s.verifier()]),
                    Err(NoteError::BadSignature { .. })
                ),
                "byte {i}"
            );
            raw[i] ^= 1;
        }
        // A changed key id makes the signature one of an unknown key.
        raw[0] ^= 1;
        let forged = format!("{head} {}\n", B64.encode(&raw));
        assert!(matches!(
            verify(&forged, &[s.verifier()]),
            Err(NoteError::UnknownKey { .. })
        ));
        // A truncated signature from a known key does not verify.
        raw[0] ^= 1;
        let forged = format!("{head} {}\n", B64.encode(&raw[..40]));
        assert!(matches!(
            verify(&forged, &[s.verifier()]),
            Err(NoteError::BadSignature { .. })
        ));
    }

    #[test]
    fn a_bad_signature_from_a_trusted_key_spoils_the_note() {
        let (old, new) = (signer(1), signer(2));
        let good_new = new.sign(&checkpoint()).unwrap();
        let other = Checkpoint {
            size: 5,
            ..checkpoint()
        };
        let old_line = old.sign(&other).unwrap();
        let old_line = old_line.lines().last().unwrap();
        let mixed = format!("{good_new}{old_line}\n");
        assert!(matches!(
            verify(&mixed, &[new.verifier(), old.verifier()]),
            Err(NoteError::BadSignature { .. })
        ));
        // ... but is ignored when that key is not trusted.
        assert_eq!(verify(&mixed, &[new.verifier()]), Ok(checkpoint()));
    }

    #[test]
    fn tampered_verifier_key_is_refused() {
        let vkey = signer(1).verifier_key();
        let mut bytes = vkey.clone().into_bytes();
        for i in 0..bytes.len() {
            let orig = bytes[i];
            bytes[i] = orig.wrapping_add(1);
            if let Ok(k) = std::str::from_utf8(&bytes) {
                assert!(Verifier::parse(k).is_err(), "{k}");
            }
            bytes[i] = orig;
        }
        for bad in [
            "",
            "name",
            "name+c74f20a3",
            "na me+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+c74f20a+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10",
            "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWAA==",
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        ] {
            assert!(
                matches!(Verifier::parse(bad), Err(NoteError::InvalidVerifierKey(_))),
                "{bad:?}"
            );
        }
        assert!(Verifier::parse(PETER_VKEY).is_ok());
    }

    #[test]
    fn malformed_notes_are_refused() {
        let s = signer(1);
        let note = s.sign(&checkpoint()).unwrap();
        let body = checkpoint().body();
        let line = note.strip_prefix(&format!("{body}\n")).unwrap();
        let cases = [
            String::new(),
            body.clone(),
            format!("{body}\n"),
            format!("{body}{line}"),
            format!("{body}\n{}", line.trim_end()),
            format!("{body}\n{}", line.replacen('\u{2014}', "-", 1)),
            format!("{body}\n{}", line.replacen("\u{2014} ", "\u{2014}", 1)),
            format!("{body}\n{}", line.replacen("node-1 ", "node-1", 1)),
            format!("{body}\n{line}garbage\n"),
            format!("{body}\n{}", line.replacen("node-1 ", "node-1 !!!", 1)),
            format!("{body}\n\u{2014} +bad {}\n", B64.encode([0u8; 68])),
            format!("{body}\n\u{2014} name {}\n", B64.encode([0u8; 4])),
            format!("{}\r\n\n{line}", body.trim_end()),
            format!("{body}\n{}", line.repeat(MAX_SIGNATURES + 1)),
        ];
        for (i, case) in cases.iter().enumerate() {
            let err = verify(case, &[s.verifier()]).unwrap_err();
            assert!(matches!(err, NoteError::Malformed(_)), "case {i}: {err}");
        }
        // Up to the limit is fine.
        let many = format!("{body}\n{}", line.repeat(MAX_SIGNATURES));
        assert_eq!(verify(&many, &[s.verifier()]), Ok(checkpoint()));
    }

    #[test]
    fn signed_text_that_is_not_a_checkpoint_is_refused() {
        let s = signer(1);
        let root = B64.encode([0u8; 32]);
        for (i, body) in [
            format!("o\n5\n{root}\n\u{7f}\n"),
            "o\n5\n".to_string(),
            format!("\n5\n{root}\n"),
            format!("o\n05\n{root}\n"),
            format!("o\n+5\n{root}\n"),
            format!("o\n-5\n{root}\n"),
            format!("o\n18446744073709551616\n{root}\n"),
            format!("o\n5\n{}\n", B64.encode([0u8; 31])),
            format!("o\n5\n{}\n", root.trim_end_matches('=')),
            "o\n5\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=\n".to_string(),
            "o\n5\nnot base64\n".to_string(),
        ]
        .iter()
        .enumerate()
        {
            let note = sign_text(body, &[&s]).unwrap();
            let err = verify(&note, &[s.verifier()]).unwrap_err();
            assert!(
                matches!(err, NoteError::InvalidCheckpoint(_)),
                "case {i}: {err}"
            );
        }
        assert!(Checkpoint::from_body(&format!("o\n0\n{root}\n")).is_ok());
        assert!(Checkpoint::from_body(&format!("o\n18446744073709551615\n{root}\n")).is_ok());
    }

    #[test]
    fn invalid_names_and_origins_are_refused() {
        for name in ["", "a b", "a+b", "a\u{a0}b", "a\nb"] {
            assert!(matches!(
                NoteSigner::new(name, [1; 32]),
                Err(NoteError::InvalidKeyName(_))
            ));
        }
        let s = signer(1);
        for origin in ["", "a\nb", "a\tb"] {
            let cp = Checkpoint {
                origin: origin.into(),
                ..checkpoint()
            };
            assert!(
                matches!(s.sign(&cp), Err(NoteError::InvalidCheckpoint(_))),
                "{origin:?}"
            );
        }
        for ext in ["", "a\nb", "a\rb"] {
            let cp = Checkpoint {
                extensions: vec![ext.into()],
                ..checkpoint()
            };
            assert!(
                matches!(s.sign(&cp), Err(NoteError::InvalidCheckpoint(_))),
                "{ext:?}"
            );
        }
        assert!(sign_text("", &[&s]).is_err());
        assert!(sign_text("a", &[&s]).is_err());
        assert!(sign_text("a\n\n", &[&s]).is_err());
        assert!(sign_text("a\n", &[]).is_err());
    }

    #[test]
    fn error_messages_say_what_to_do() {
        let e = NoteError::UnknownKey {
            found: vec!["a+00000001".into()],
            trusted: vec![],
        };
        let msg = e.to_string();
        assert!(msg.contains("a+00000001") && msg.contains("no key") && msg.contains("rotation"));
        assert!(NoteError::BadSignature { key: "k+1".into() }
            .to_string()
            .contains("altered"));
    }
}
