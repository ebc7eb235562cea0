//! The on-disk framing of one ledger record, shared by the ledger writer and `audit verify`, and
//! the hash chain that links the records.
//!
//! ```text
//! offset  size  field
//!      0     1  magic 0xA1
//!      1     4  payload length, u32 little-endian, at most MAX_RECORD
//!      5     8  sequence number, u64 little-endian
//!     13   len  payload
//! 13+len     4  CRC-32 (IEEE 802.3, as zlib and gzip) of bytes 0..13+len, u32 little-endian
//! ```
//!
//! The checksum covers the header too, so a flipped bit in the length or the sequence number is
//! caught like one in the payload. It detects accidents (torn writes, bit rot), not tampering:
//! that is the hash chain's and the Merkle tree's job.
//!
//! [`decode`] tells a torn tail ([`FrameError::Truncated`]: the buffer ends inside the frame)
//! from damage ([`FrameError::BadMagic`], [`FrameError::BadChecksum`],
//! [`FrameError::TooLarge`]). A damaged length field that points past the end of the buffer
//! also reads as `Truncated`; recovery should only cut a "torn" tail off the *last* segment,
//! and can tell the two apart by whether a valid frame follows the cut point.

use super::merkle::Hash;

/// The first byte of every frame.
pub const MAGIC: u8 = 0xA1;
/// The largest payload a frame may carry: 1 MiB.
pub const MAX_RECORD: usize = 1 << 20;
/// Bytes before the payload: magic, length, sequence number.
pub const HEADER_LEN: usize = 13;
/// Bytes a frame adds to its payload: the header and the checksum.
pub const OVERHEAD: usize = HEADER_LEN + 4;

/// One decoded record, borrowing its payload from the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub seq: u64,
    pub payload: &'a [u8],
}

/// Why bytes are not a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The buffer ends inside the frame: a torn write at the tail, if it is at the very end of
    /// the ledger.
    #[error(
        "record truncated: {available} bytes left where the record needs {needed} (a torn write at the end of the ledger, or a damaged length field)"
    )]
    Truncated { available: usize, needed: usize },
    /// The first byte is not [`MAGIC`]: not the start of a record.
    #[error("no record starts here: found byte {found:#04x} where the record marker 0xa1 belongs")]
    BadMagic { found: u8 },
    /// The checksum does not match the bytes: the record was damaged or altered.
    #[error("record checksum mismatch: stored {stored:#010x}, computed {computed:#010x} (the record was damaged or altered)")]
    BadChecksum { stored: u32, computed: u32 },
    /// The length field is above [`MAX_RECORD`] (on decode: a damaged length field).
    #[error("record length {len} exceeds the maximum of {max} bytes", max = MAX_RECORD)]
    TooLarge { len: u64 },
}

/// Appends the frame of record `seq` with `payload` to `out`.
///
/// Refuses (and writes nothing) a payload above [`MAX_RECORD`], which [`decode`] could never
/// read back.
pub fn encode(seq: u64, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    encode_parts(seq, &[payload], out)
}

/// Appends the frame of record `seq` whose payload is `parts` one after the other: the same
/// bytes as [`encode`] of their concatenation, without building it first.
pub fn encode_parts(seq: u64, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_RECORD {
        return Err(FrameError::TooLarge { len: len as u64 });
    }
    let start = out.len();
    out.reserve(OVERHEAD + len);
    out.push(MAGIC);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes the frame at the start of `buf`, returning it and the number of bytes it took.
pub fn decode(buf: &[u8]) -> Result<(Frame<'_>, usize), FrameError> {
    let Some(&first) = buf.first() else {
        return Err(FrameError::Truncated {
            available: 0,
            needed: OVERHEAD,
        });
    };
    if first != MAGIC {
        return Err(FrameError::BadMagic { found: first });
    }
    if buf.len() < HEADER_LEN {
        // Even a torn header is reported as torn, not as damaged: the length may be unreadable.
        return Err(FrameError::Truncated {
            available: buf.len(),
            needed: OVERHEAD,
        });
    }
    let len = u32::from_le_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD {
        return Err(FrameError::TooLarge { len: len as u64 });
    }
    let total = OVERHEAD + len;
    if buf.len() < total {
        return Err(FrameError::Truncated {
            available: buf.len(),
            needed: total,
        });
    }
    let body_end = HEADER_LEN + len;
    let stored = u32::from_le_bytes(buf[body_end..total].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&buf[..body_end]);
    if stored != computed {
        return Err(FrameError::BadChecksum { stored, computed });
    }
    let seq = u64::from_le_bytes(buf[5..HEADER_LEN].try_into().expect("8 bytes"));
    Ok((
        Frame {
            seq,
            payload: &buf[HEADER_LEN..body_end],
        },
        total,
    ))
}

/// Where each frame of `buf` lies, in order: its sequence number, its first byte and the byte
/// after it. The first bytes that are not a whole frame end the walk with their error. For
/// tools and tests that change a segment record by record.
pub fn spans(buf: &[u8]) -> Result<Vec<(u64, usize, usize)>, FrameError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let (f, used) = decode(&buf[at..])?;
        out.push((f.seq, at, at + used));
        at += used;
    }
    Ok(out)
}

/// Where the hash chain starts: the link before the first record.
pub const CHAIN_START: Hash = [0; 32];

/// The next link of the hash chain: `SHA-256(prev || leaf)`, where `leaf` is the record's
/// Merkle leaf hash ([`super::merkle::leaf_hash`] of its payload). Each link commits to every
/// record before it, so removing, inserting or reordering records changes every later link.
pub fn chain_next(prev: &Hash, leaf: &Hash) -> Hash {
    super::merkle::hash_pair(prev, leaf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn frame(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(seq, payload, &mut out).unwrap();
        out
    }

    #[test]
    fn spans_walk_every_frame_and_stop_at_a_torn_one() {
        let mut buf = Vec::new();
        encode(7, b"a", &mut buf).unwrap();
        encode(8, b"bcd", &mut buf).unwrap();
        let whole = buf.len();
        assert_eq!(
            spans(&buf).unwrap(),
            vec![(7, 0, OVERHEAD + 1), (8, OVERHEAD + 1, whole)]
        );
        encode(9, b"torn", &mut buf).unwrap();
        buf.pop();
        assert!(matches!(spans(&buf), Err(FrameError::Truncated { .. })));
    }

    #[test]
    fn a_frame_from_parts_is_the_frame_of_their_concatenation() {
        let whole = b"{\"kind\":\"request\",\"seq\":1234567}";
        for cut in [0, 1, 20, whole.len() - 8, whole.len() - 1, whole.len()] {
            let (a, b) = whole.split_at(cut);
            let mut out = vec![0xEE];
            encode_parts(99, &[a, b"", b], &mut out).unwrap();
            assert_eq!(out[1..], frame(99, whole)[..], "cut at {cut}");
        }
        let half = vec![0u8; MAX_RECORD / 2 + 1];
        let mut out = Vec::new();
        assert_eq!(
            encode_parts(1, &[&half, &half], &mut out),
            Err(FrameError::TooLarge {
                len: 2 * half.len() as u64
            })
        );
        assert!(
            out.is_empty(),
            "nothing is written for a payload that cannot be framed"
        );
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        let payloads: [&[u8]; 4] = [b"", b"x", b"{\"seq\":7}", &[0xA1; 300]];
        for (i, p) in payloads.iter().enumerate() {
            encode(u64::MAX - i as u64, p, &mut buf).unwrap();
        }
        let mut at = 0;
        for (i, p) in payloads.iter().enumerate() {
            let (f, used) = decode(&buf[at..]).unwrap();
            assert_eq!(f.seq, u64::MAX - i as u64);
            assert_eq!(f.payload, *p);
            assert_eq!(used, OVERHEAD + p.len());
            at += used;
        }
        assert_eq!(at, buf.len());
        assert_eq!(
            decode(&buf[at..]),
            Err(FrameError::Truncated {
                available: 0,
                needed: OVERHEAD
            })
        );
    }

    #[test]
    fn layout_is_as_documented() {
        let f = frame(0x0102030405060708, b"ab");
        assert_eq!(f[0], 0xA1);
        assert_eq!(&f[1..5], &[2, 0, 0, 0]);
        assert_eq!(&f[5..13], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&f[13..15], b"ab");
        assert_eq!(&f[15..], &crc32fast::hash(&f[..15]).to_le_bytes());
        // CRC-32/IEEE check value.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn largest_record_fits_and_one_more_byte_does_not() {
        let big = vec![7u8; MAX_RECORD];
        let f = frame(1, &big);
        assert_eq!(decode(&f).unwrap().0.payload.len(), MAX_RECORD);
        let mut out = b"keep".to_vec();
        assert_eq!(
            encode(1, &vec![0; MAX_RECORD + 1], &mut out),
            Err(FrameError::TooLarge {
                len: MAX_RECORD as u64 + 1
            })
        );
        assert_eq!(out, b"keep", "nothing written for a refused record");
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        for payload in [&b""[..], b"a", b"{\"kind\":\"request\",\"seq\":42}"] {
            let good = frame(42, payload);
            for pos in 0..good.len() {
                for v in 0..=255u8 {
                    if v == good[pos] {
                        continue;
                    }
                    let mut bad = good.clone();
                    bad[pos] = v;
                    let err = decode(&bad).expect_err("corruption not detected");
                    match pos {
                        0 => assert_eq!(err, FrameError::BadMagic { found: v }),
                        1..=4 => assert!(
                            matches!(
                                err,
                                FrameError::TooLarge { .. }
                                    | FrameError::Truncated { .. }
                                    | FrameError::BadChecksum { .. }
                            ),
                            "{err:?}"
                        ),
                        _ => assert!(matches!(err, FrameError::BadChecksum { .. }), "{err:?}"),
                    }
                    // Followed by another record, a damaged length is never read as valid.
                    let mut two = bad.clone();
                    two.extend_from_slice(&frame(43, b"next"));
                    assert!(decode(&two).is_err(), "pos {pos} value {v}");
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_truncated() {
        let good = frame(9, b"payload bytes");
        for cut in 0..good.len() {
            match decode(&good[..cut]) {
                Err(FrameError::Truncated { available, needed }) => {
                    assert_eq!(available, cut);
                    assert!(needed > cut);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        assert!(decode(&good).is_ok());
    }

    #[test]
    fn too_large_length_is_refused_before_reading() {
        let mut f = frame(1, b"");
        f[1..5].copy_from_slice(&(MAX_RECORD as u32 + 1).to_le_bytes());
        assert_eq!(
            decode(&f),
            Err(FrameError::TooLarge {
                len: MAX_RECORD as u64 + 1
            })
        );
    }

    #[test]
    fn chain_links_commit_to_order() {
        let a = super::super::merkle::leaf_hash(b"a");
        let b = super::super::merkle::leaf_hash(b"b");
        let ab = chain_next(&chain_next(&CHAIN_START, &a), &b);
        let ba = chain_next(&chain_next(&CHAIN_START, &b), &a);
        assert_ne!(ab, ba);
        let mut cat = [0u8; 64];
        cat[32..].copy_from_slice(&a);
        let direct: Hash = Sha256::digest(cat).into();
        assert_eq!(chain_next(&CHAIN_START, &a), direct);
    }
}
