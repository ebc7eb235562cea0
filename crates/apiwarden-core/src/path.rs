//! Request path normalisation.
//!
//! Routing decisions are made on the normalised path, and the normalised path is what the
//! upstream receives, so the gateway and the upstream can never disagree about which resource
//! a request names.
//!
//! Steps, in order:
//! 1. percent-encoded *unreserved* characters (`A-Z a-z 0-9 - . _ ~`) are decoded, every other
//!    percent-encoding is kept with upper-case hex digits (`%2f` becomes `%2F`);
//! 2. duplicate slashes are merged (`//admin` becomes `/admin`);
//! 3. dot segments are removed as RFC 3986 section 5.2.4 says, after step 1, so `%2e%2e` is the
//!    same `..` as the plain one; `..` above the root stays at the root.
//!
//! An encoded slash (`%2F`) or backslash (`%5C`), and a raw backslash, are never segment
//! separators here. Some upstreams treat them as separators (IIS and some static servers take
//! `\` for `/`), so by default ([`EncodedSlashes::Reject`]) such a path is refused; with
//! [`EncodedSlashes::Keep`] they stay inside their segment (a raw backslash is sent as `%5C`),
//! where they cannot match a route boundary.
//!
//! A path parameter (a raw `;` in a segment) is refused by default ([`PathParameters::Reject`]):
//! Tomcat, Jetty and Spring cut `;...` off each segment before they match, so `/admin;x` is
//! their `/admin` while a router that compares segments whole sees another path, and
//! `/a/..;/admin` is their `/admin`. With [`PathParameters::Keep`] the parameter stays part of
//! its segment, as RFC 3986 has it, except after a dot segment (`..;x`, `.;`), which is still
//! refused. An encoded `%3B` is not a parameter for any of them and is kept. Bytes outside
//! ASCII are percent-encoded.

use std::fmt;

/// What to do with `%2F` and `%5C` in a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EncodedSlashes {
    /// Reject the request with `400` (the default: an upstream that decodes them could otherwise
    /// be tricked into serving a path the gateway never routed).
    #[default]
    Reject,
    /// Keep them encoded, inside their segment.
    Keep,
}

/// What to do with a path parameter (a raw `;`) in a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PathParameters {
    /// Reject the request with `400` (the default: an upstream that cuts parameters off its
    /// segments could otherwise serve `/admin` for `/admin;x`, which no `/admin` route matched).
    #[default]
    Reject,
    /// Keep them inside their segment, where they are part of the segment for routing too.
    Keep,
}

/// The rules a request path is normalised under (the `gateway.encoded_slashes` and
/// `gateway.path_parameters` options).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PathRules {
    pub encoded_slashes: EncodedSlashes,
    pub parameters: PathParameters,
}

impl PathRules {
    /// Everything kept that can be kept: the normal form of a path that the options would
    /// refuse as a request (a route's own path is checked against this).
    pub const KEEP: PathRules = PathRules {
        encoded_slashes: EncodedSlashes::Keep,
        parameters: PathParameters::Keep,
    };
}

/// Why a path could not be normalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// The path does not start with `/`.
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadPercentEncoding,
    /// An encoded slash or a (raw or encoded) backslash while [`EncodedSlashes::Reject`] is in
    /// force.
    EncodedSlash,
    /// A dot segment with a path parameter, such as `..;`.
    DotSegmentParameter,
    /// A path parameter (`;`) while [`PathParameters::Reject`] is in force.
    Parameter,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the request path must start with '/'",
            PathError::BadPercentEncoding => "the request path has an invalid percent-encoding",
            PathError::EncodedSlash => {
                "encoded slashes and backslashes (%2F, %5C, \\) are not allowed in the path"
            }
            PathError::DotSegmentParameter => {
                "a dot segment with a parameter (such as '..;') is not allowed in the path"
            }
            PathError::Parameter => "a path parameter (';') is not allowed in the path",
        })
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Returns true when `path` is already in normal form, so the common case allocates nothing.
fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let mut seg_start = 1;
    for i in 1..=b.len() {
        if i == b.len() || b[i] == b'/' {
            let seg = &b[seg_start..i];
            if (i < b.len() && seg.is_empty()) || seg == b"." || seg == b".." {
                return false;
            }
            seg_start = i + 1;
        } else if matches!(b[i], b'%' | b'\\' | b';') || !b[i].is_ascii() {
            return false;
        }
    }
    true
}

/// Normalises a request path (without the query string). See the module documentation.
pub fn normalize(path: &str, rules: PathRules) -> Result<std::borrow::Cow<'_, str>, PathError> {
    let slashes = rules.encoded_slashes;
    if is_normal(path) {
        return Ok(std::borrow::Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Step 1: decode unreserved, canonicalise the rest, collecting segments.
    let mut segments: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut i = 1;
    while i <= bytes.len() {
        if i == bytes.len() || bytes[i] == b'/' {
            segments.push(std::mem::take(&mut current));
            i += 1;
            continue;
        }
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex_val),
                bytes.get(i + 2).copied().and_then(hex_val),
            ) else {
                return Err(PathError::BadPercentEncoding);
            };
            let v = h * 16 + l;
            if is_unreserved(v) {
                current.push(v as char);
            } else {
                if (v == b'/' || v == b'\\') && slashes == EncodedSlashes::Reject {
                    return Err(PathError::EncodedSlash);
                }
                current.push('%');
                current.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                current.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
            }
            i += 3;
        } else if b == b'\\' {
            if slashes == EncodedSlashes::Reject {
                return Err(PathError::EncodedSlash);
            }
            current.push_str("%5C");
            i += 1;
        } else if b == b';' && rules.parameters == PathParameters::Reject {
            return Err(PathError::Parameter);
        } else if !b.is_ascii() {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            current.push('%');
            current.push(char::from(HEX[usize::from(b >> 4)]));
            current.push(char::from(HEX[usize::from(b & 0xf)]));
            i += 1;
        } else {
            current.push(char::from(b));
            i += 1;
        }
    }
    for seg in &segments {
        if let Some((head, _)) = seg.split_once(';') {
            if head == "." || head == ".." {
                return Err(PathError::DotSegmentParameter);
            }
        }
    }
    // Steps 2 and 3: merge empty segments and resolve dot segments on a stack.
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let mut trailing_slash = false;
    for (idx, seg) in segments.iter().enumerate() {
        match seg.as_str() {
            "" => trailing_slash = idx == last,
            "." => trailing_slash = idx == last,
            ".." => {
                out.pop();
                trailing_slash = idx == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(path.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        result.push('/');
    }
    Ok(std::borrow::Cow::Owned(result))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, KEEP_PARAMETERS).map(|c| c.into_owned())
    }

    /// Encoded slashes refused, path parameters kept.
    const KEEP_PARAMETERS: PathRules = PathRules {
        encoded_slashes: EncodedSlashes::Reject,
        parameters: PathParameters::Keep,
    };

    #[test]
    fn path_parameters_are_refused_by_default() {
        for p in [
            "/admin;x",
            "/admin;x/users",
            "/users/me;jsessionid=1",
            "/public/..;/admin",
            "/a/%2e%2e;/admin",
            "/caf\u{e9};x",
        ] {
            assert_eq!(
                normalize(p, PathRules::default()),
                Err(PathError::Parameter),
                "{p:?}"
            );
        }
        // An encoded `;` is no parameter: kept encoded, as any reserved character.
        assert_eq!(
            normalize("/a%3bx", PathRules::default()).as_deref(),
            Ok("/a%3Bx")
        );
        assert_eq!(
            normalize("/a/./b", PathRules::default()).as_deref(),
            Ok("/a/b")
        );
    }

    #[test]
    fn normalisation_table() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/", Ok("/")),
            ("/orders", Ok("/orders")),
            ("/orders/", Ok("/orders/")),
            ("//admin", Ok("/admin")),
            ("/a//b///c", Ok("/a/b/c")),
            ("/a/../admin", Ok("/admin")),
            ("/a/./b", Ok("/a/b")),
            ("/a/b/..", Ok("/a/")),
            ("/..", Ok("/")),
            ("/../../admin", Ok("/admin")),
            ("/a/%2e%2e/admin", Ok("/admin")),
            ("/a/%2E%2e/admin", Ok("/admin")),
            ("/a/.%2E/admin", Ok("/admin")),
            ("/%61dmin", Ok("/admin")),
            ("/%7euser", Ok("/~user")),
            ("/a%20b", Ok("/a%20b")),
            ("/a%3fb", Ok("/a%3Fb")),
            ("/public%2F..%2Fadmin", Err(PathError::EncodedSlash)),
            ("/a%2fb", Err(PathError::EncodedSlash)),
            ("/a%5Cb", Err(PathError::EncodedSlash)),
            ("/a%zz", Err(PathError::BadPercentEncoding)),
            ("/a%2", Err(PathError::BadPercentEncoding)),
            ("/public/..\\admin", Err(PathError::EncodedSlash)),
            ("/public/..;/admin", Err(PathError::DotSegmentParameter)),
            ("/public/.;x/admin", Err(PathError::DotSegmentParameter)),
            ("/public/%2e%2e;/admin", Err(PathError::DotSegmentParameter)),
            ("/a;v=1/b", Ok("/a;v=1/b")),
            ("/caf\u{e9}//x", Ok("/caf%C3%A9/x")),
            ("admin", Err(PathError::NotAbsolute)),
            ("", Err(PathError::NotAbsolute)),
        ];
        for (input, want) in cases {
            assert_eq!(
                n(input).as_deref().map_err(|e| *e),
                *want,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn keep_mode_leaves_encoded_slash_inside_its_segment() {
        let got = normalize("/public%2f..%2Fadmin/../x", PathRules::KEEP).unwrap();
        assert_eq!(got, "/x");
        let got = normalize("/public%2f..%2Fadmin", PathRules::KEEP).unwrap();
        assert_eq!(got, "/public%2F..%2Fadmin");
        let got = normalize("/public/..\\admin", PathRules::KEEP).unwrap();
        assert_eq!(got, "/public/..%5Cadmin");
    }

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(
            normalize("/orders/42", PathRules::default()),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
    }

    #[test]
    fn normalisation_is_idempotent() {
        for p in [
            "/a/../b/./c//d/",
            "/%2e%2E/x/%41",
            "/x/y/../../..",
            "/a%20b/%3f",
        ] {
            let once = n(p).unwrap();
            assert_eq!(n(&once).unwrap(), once, "input {p:?}");
        }
    }
}
