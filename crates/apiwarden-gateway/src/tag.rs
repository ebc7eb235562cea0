//! Keyed 128-bit tags of secrets (API key secrets, bearer tokens): what the verified-credential
//! caches hold and compare instead of the secret itself.
//!
//! SipHash-1-3 with a 128-bit output under a per-process random key: one pass over the text.
//! Without the key, nobody can make a text whose tag equals another's (a forgery would have to
//! hit a 128-bit value blind), and the tags are useless outside the process.

use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::Hasher;

fn keys() -> (u64, u64) {
    static KEYS: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    *KEYS.get_or_init(|| {
        let mut k = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
            .expect("the system random generator works");
        let (a, b) = k.split_at(8);
        (
            u64::from_le_bytes(a.try_into().expect("8 bytes")),
            u64::from_le_bytes(b.try_into().expect("8 bytes")),
        )
    })
}

/// The tag of `secret`; never `[0, 0]`, so that zero can mean "none".
pub fn tag(secret: &str) -> [u64; 2] {
    let (k0, k1) = keys();
    let mut h = SipHasher13::new_with_keys(k0, k1);
    h.write(secret.as_bytes());
    let t = h.finish128();
    [t.h1 | 1, t.h2]
}

/// A `HashMap` hasher for keys that are already tags: their first word is used as is (it is
/// uniformly random to anyone without the process key), instead of hashing them again.
#[derive(Clone, Copy, Default)]
pub struct TagHasher(u64);

impl Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // A `[u64; 2]` key arrives here as its 16 bytes in one call (integer slices hash as
        // bytes): the result mixes both words, and stays as unpredictable as the tag is.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(5) ^ n;
    }

    fn write_usize(&mut self, _: usize) {}
}

pub type TagBuildHasher = std::hash::BuildHasherDefault<TagHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_differ_by_text_and_are_never_zero() {
        assert_eq!(tag("a"), tag("a"));
        assert_ne!(tag("a"), tag("b"));
        assert_ne!(tag(""), [0, 0]);
    }

    #[test]
    fn a_tag_map_finds_its_keys() {
        let mut m: std::collections::HashMap<[u64; 2], u32, TagBuildHasher> = Default::default();
        for i in 0..1000 {
            m.insert(tag(&i.to_string()), i);
        }
        for i in 0..1000 {
            assert_eq!(m.get(&tag(&i.to_string())), Some(&i));
        }
    }
}
