//! Request and event ids: UUIDv7 (RFC 9562), time-ordered.
//!
//! The random part comes from a per-thread generator seeded once from the OS, so an id costs no
//! system call. Ids are identifiers, not secrets: they need to be unique, not unpredictable.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut buf = [0u8; 8];
    // uuid's own v4 draws from the OS generator; one draw per thread.
    buf.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
    u64::from_le_bytes(buf) | 1
}

/// splitmix64: fast, and good enough for the random bits of an id.
fn next() -> u64 {
    STATE.with(|s| {
        let mut z = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// A new UUIDv7, for ids of events and requests.
pub fn new_id() -> uuid::Uuid {
    new_id_at(SystemTime::now())
}

/// A new UUIDv7 with the timestamp `now` (one clock read for several ids of one request).
pub fn new_id_at(now: SystemTime) -> uuid::Uuid {
    let millis = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&next().to_le_bytes());
    random[8..].copy_from_slice(&next().to_le_bytes()[..2]);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// The hyphenated text of an id as a header value, without going through `fmt`. The bytes
/// are owned by the value's one allocation, so its clones (the request's header and the
/// response's) share it instead of each making another.
pub fn header_value(id: uuid::Uuid) -> http::HeaderValue {
    let mut buf = [0u8; 36];
    id.hyphenated().encode_lower(&mut buf);
    http::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .expect("a UUID is a valid header value")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_v7_and_distinct() {
        let a = super::new_id();
        let b = super::new_id();
        assert_eq!(a.get_version_num(), 7);
        assert_ne!(a, b);
        let (ta, tb) = (
            a.get_timestamp().unwrap().to_unix(),
            super::new_id().get_timestamp().unwrap().to_unix(),
        );
        assert!(tb >= ta, "time-ordered");
    }
}
