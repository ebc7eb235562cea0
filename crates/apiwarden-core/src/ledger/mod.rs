//! The cryptographic core of the tamper-evident audit ledger, with no I/O: what the ledger
//! writer, `audit verify`, `audit prove` and `audit verify-proof` share.
//!
//! - [`frame`]: the on-disk framing of one record (magic, length, sequence number, payload,
//!   CRC-32) and the hash chain that links the records (`SHA-256(previous link || leaf hash)`).
//! - [`merkle`]: the RFC 6962 Merkle tree over the records: leaf and node hashes, tree heads,
//!   the incremental [`Tree`] the writer appends to, inclusion and consistency proofs.
//! - [`note`]: checkpoints (origin, tree size, root) as C2SP signed notes, signed and verified
//!   with Ed25519.
//!
//! A record's Merkle leaf is [`leaf_hash`] of its frame's payload (for an encrypted ledger, the
//! ciphertext), so a ledger can be verified without being able to read it.

pub mod frame;
pub mod merkle;
pub mod note;

pub use frame::{chain_next, decode, encode, Frame, FrameError, CHAIN_START, MAX_RECORD};
pub use merkle::{
    consistency_proof, inclusion_proof, leaf_hash, node_hash, root, verify_consistency,
    verify_inclusion, Hash, Tree, EMPTY_ROOT,
};
pub use note::{verify, Checkpoint, NoteError, NoteSigner, Verifier};
