//! API keys as clients send them: `aw_<key_id>_<secret>`.
//!
//! The key id (12 lowercase hex digits) is public: it names the key in logs, audit events and
//! the command line. The secret (64 lowercase hex digits, 256 random bits) is shown once, when
//! the key is issued, and stored only as an HMAC-SHA256 under a server-side pepper.

/// Length of a key id in hex digits.
pub const KEY_ID_LEN: usize = 12;
/// Length of a secret in hex digits (256 bits).
pub const SECRET_LEN: usize = 64;

/// An API key split into its parts.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub key_id: &'a str,
    pub secret: &'a str,
}

/// Splits `aw_<key_id>_<secret>`; `None` when the text is not in that form.
pub fn parse(text: &str) -> Option<ParsedKey<'_>> {
    let rest = text.strip_prefix("aw_")?;
    let (key_id, secret) = rest.split_once('_')?;
    // Without an early exit, so the check compiles to straight-line (vectorised) code: this
    // runs on every request of an API key route.
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes().fold(true, |ok, b| {
                ok & ((b.wrapping_sub(b'0') < 10) | (b.wrapping_sub(b'a') < 6))
            })
    };
    (hex(key_id, KEY_ID_LEN) && hex(secret, SECRET_LEN)).then_some(ParsedKey { key_id, secret })
}

/// The text a client sends for a key id and secret.
pub fn format(key_id: &str, secret: &str) -> String {
    format!("aw_{key_id}_{secret}")
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_only_in_their_exact_form() {
        let id = "0123456789ab";
        let secret = "f".repeat(64);
        let k = format(id, &secret);
        assert_eq!(
            parse(&k),
            Some(ParsedKey {
                key_id: id,
                secret: &secret
            })
        );
        for bad in [
            "",
            "aw_",
            &format!("aw_{id}"),
            &format!("aw_{id}_{}", "f".repeat(63)),
            &format!("aw_{id}_{}", "F".repeat(64)),
            &format!("ak_{id}_{secret}"),
            &format!("aw_0123456789a_{secret}"),
            &format!("aw_{id}_{secret}_"),
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
    }
}
