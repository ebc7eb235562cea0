//! Route matching on host, normalised path and method.
//!
//! Routes are tried from the most specific to the least: routes with an exact host, then a
//! wildcard host, then any host; within those, exact paths, then templates (more literal
//! segments first), then prefixes (longer first); ties keep the order of the file.

use crate::config::{HostMatch, PathMatch, RouteConfig, TemplateSegment};

/// A compiled routing table. Matching allocates nothing.
#[derive(Clone, Debug)]
pub struct Router {
    entries: Vec<Entry>,
}

#[derive(Clone, Debug)]
struct Entry {
    route: usize,
    host: Option<HostMatch>,
    path: PathMatch,
    methods: Option<Vec<String>>,
}

fn priority(r: &RouteConfig) -> (u8, u8, usize) {
    let host = match r.host {
        Some(HostMatch::Exact(_)) => 0,
        Some(HostMatch::Suffix(_)) => 1,
        None => 2,
    };
    let (kind, weight) = match &r.path {
        PathMatch::Exact(_) => (0, 0),
        PathMatch::Template(segs) => {
            let literals = segs
                .iter()
                .filter(|s| matches!(s, TemplateSegment::Literal(_)))
                .count();
            (1, usize::MAX - literals)
        }
        PathMatch::Prefix(p) => (2, usize::MAX - p.len()),
    };
    (host, kind, weight)
}

impl Router {
    /// Compiles the routes; the index a match returns is the index into `routes`.
    pub fn new(routes: &[RouteConfig]) -> Self {
        let mut order: Vec<usize> = (0..routes.len()).collect();
        order.sort_by_key(|&i| priority(&routes[i]));
        let entries = order
            .into_iter()
            .map(|i| Entry {
                route: i,
                host: routes[i].host.clone(),
                path: routes[i].path.clone(),
                methods: routes[i].methods.clone(),
            })
            .collect();
        Router { entries }
    }

    /// Finds the route for a request. `host` is without port; `path` must be normalised.
    pub fn find(&self, host: Option<&str>, method: &str, path: &str) -> Option<usize> {
        self.entries
            .iter()
            .find(|e| {
                host_matches(e.host.as_ref(), host)
                    && path_matches(&e.path, path)
                    && method_matches(e.methods.as_deref(), method)
            })
            .map(|e| e.route)
    }
}

fn host_matches(want: Option<&HostMatch>, host: Option<&str>) -> bool {
    match (want, host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(HostMatch::Exact(w)), Some(h)) => w.eq_ignore_ascii_case(h),
        (Some(HostMatch::Suffix(suffix)), Some(h)) => {
            h.len() > suffix.len()
                && h.is_char_boundary(h.len() - suffix.len())
                && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
    }
}

fn method_matches(methods: Option<&[String]>, method: &str) -> bool {
    methods.is_none_or(|ms| ms.iter().any(|m| m == method))
}

fn path_matches(want: &PathMatch, path: &str) -> bool {
    match want {
        PathMatch::Exact(p) => p == path,
        PathMatch::Prefix(p) => {
            // The prefix is stored without a trailing slash ("" for "/").
            path.starts_with(p.as_str())
                && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
        }
        PathMatch::Template(segs) => {
            let mut parts = path.split('/').skip(1);
            for seg in segs {
                match (seg, parts.next()) {
                    (TemplateSegment::Literal(l), Some(p)) if l == p => {}
                    (TemplateSegment::Param(_), Some(p)) if !p.is_empty() => {}
                    _ => return false,
                }
            }
            parts.next().is_none()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::path::{normalize, EncodedSlashes, PathParameters, PathRules};

    const ROUTES: &str = r#"
[[upstreams]]
name = "u"
url = "http://127.0.0.1:1"
[[routes]]
name = "public"
path_prefix = "/public"
upstream = "u"
auth = ["none"]
[[routes]]
name = "admin"
path_prefix = "/admin"
upstream = "u"
auth = ["api_key"]
[[routes]]
name = "order"
path = "/orders/{id}"
methods = ["GET"]
upstream = "u"
auth = ["none"]
[[routes]]
name = "order-new"
path = "/orders/new"
upstream = "u"
auth = ["none"]
[[routes]]
name = "api-host"
host = "api.example.com"
path_prefix = "/"
upstream = "u"
auth = ["none"]
[[routes]]
name = "wild-host"
host = "*.example.org"
path_prefix = "/public"
upstream = "u"
auth = ["none"]
"#;

    fn find(host: Option<&str>, method: &str, raw_path: &str) -> Option<String> {
        let cfg = parse(ROUTES, "r.toml").unwrap();
        let router = Router::new(&cfg.routes);
        let path = normalize(raw_path, PathRules::KEEP).ok()?;
        router
            .find(host, method, &path)
            .map(|i| cfg.routes[i].name.clone())
    }

    #[test]
    fn routing_table() {
        let cases: &[(Option<&str>, &str, &str, Option<&str>)] = &[
            (None, "GET", "/public", Some("public")),
            (None, "GET", "/public/x/y", Some("public")),
            (None, "GET", "/publicity", None),
            (None, "GET", "/orders/42", Some("order")),
            (None, "POST", "/orders/42", None),
            (None, "GET", "/orders/new", Some("order-new")),
            (None, "GET", "/orders/42/x", None),
            (None, "GET", "/orders/", None),
            (Some("api.example.com"), "GET", "/public", Some("api-host")),
            (
                Some("API.Example.COM"),
                "GET",
                "/anything",
                Some("api-host"),
            ),
            (Some("a.example.org"), "GET", "/public/1", Some("wild-host")),
            (Some("example.org"), "GET", "/public/1", Some("public")),
        ];
        for (host, method, path, want) in cases {
            assert_eq!(
                find(*host, method, path).as_deref(),
                *want,
                "{host:?} {method} {path}"
            );
        }
    }

    /// Random paths built from the pieces tricks are made of: whatever a path normalises to is
    /// stable and is itself a plain path: no dot segment, empty segment, raw backslash, encoded
    /// slash or encoded dot is left to be decoded differently downstream.
    #[test]
    fn random_paths_normalise_to_stable_plain_paths() {
        // Path parameters kept, so that `;` and `..;` stay among the pieces tried.
        let rules = PathRules {
            encoded_slashes: EncodedSlashes::Reject,
            parameters: PathParameters::Keep,
        };
        let pieces = [
            "/", "//", "admin", "public", "orders", "new", "42", ".", "..", "%2e", "%2E", "%2e%2e",
            ".%2e", "%2f", "%2F", "%5c", "\\", ";", "..;", "%61", "%41", "a", "%20", "%zz", "%",
            "~", "%7e",
        ];
        let mut rng = crate::XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let n = 1 + rng.below(8);
            let mut path = String::from("/");
            for _ in 0..n {
                path.push_str(pieces[rng.below(pieces.len())]);
            }
            let Ok(norm) = normalize(&path, rules) else {
                continue;
            };
            assert_eq!(
                normalize(&norm, rules).as_deref(),
                Ok(&*norm),
                "stable: {path:?}"
            );
            let segs: Vec<&str> = norm.split('/').skip(1).collect();
            for (i, seg) in segs.iter().enumerate() {
                assert!(*seg != "." && *seg != "..", "{path:?} -> {norm:?}");
                assert!(
                    !seg.is_empty() || i == segs.len() - 1,
                    "{path:?} -> {norm:?}"
                );
            }
            let upper = norm.to_ascii_uppercase();
            assert!(
                !upper.contains("%2F") && !upper.contains("%5C") && !norm.contains('\\'),
                "{path:?} -> {norm:?}"
            );
            // A route reached by the normal form is one a plain path can reach: the normal form
            // is itself a plain path (no encoded dots or slashes left to decode).
            assert!(!upper.contains("%2E"), "{path:?} -> {norm:?}");
        }
    }

    /// Path tricks must never reach a route that the plain path would not reach.
    #[test]
    fn path_tricks_cannot_reach_admin() {
        let tricks = [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/%2E%2e/admin",
            "/public%2F..%2Fadmin",
            "/public%2f..%2fadmin",
            "//admin",
            "/./admin",
            "/%61dmin",
        ];
        for t in tricks {
            let plain = normalize(t, PathRules::KEEP).unwrap();
            // Whatever a trick reaches, the plain normalised path reaches the same.
            assert_eq!(find(None, "GET", t), find(None, "GET", &plain), "{t}");
        }
        assert_eq!(find(None, "GET", "/public%2F..%2Fadmin"), None);
        assert_eq!(
            find(None, "GET", "/public/../admin").as_deref(),
            Some("admin")
        );
    }
}
