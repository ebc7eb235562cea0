//! Stage two: from the raw file to the validated [`Config`], collecting every error.

use super::raw;
use super::spans::{line_col, locate, Key, Node};
use super::*;
use crate::path::{normalize, EncodedSlashes, PathParameters, PathRules};
use crate::units::{ByteSize, HumanDuration};
use serde::de::DeserializeOwned;
use std::collections::HashSet;
use std::path::Path;

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
    tree: Option<Node>,
    errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    fn error_at(&mut self, offset: usize, message: String) {
        let (line, column) = line_col(self.text, offset);
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            column,
            message,
        });
    }

    fn error(&mut self, path: &[Key], message: impl Into<String>) {
        let offset = self
            .tree
            .as_ref()
            .and_then(|t| locate(t, path))
            .map_or(0, |s| s.start);
        self.error_at(offset, message.into());
    }

    /// Deserialises one section of the file, reporting an error against its position.
    fn section<T: DeserializeOwned>(
        &mut self,
        value: toml::Value,
        path: &[Key],
        what: &str,
    ) -> Option<T> {
        match value.try_into::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                let msg = e.message().trim().to_string();
                // Point an unknown key at the key itself.
                let mut at: Vec<Key> = path.to_vec();
                if let Some(rest) = msg.strip_prefix("unknown field `") {
                    if let Some(name) = rest.split('`').next() {
                        at.push(Key::Owned(name.to_string()));
                    }
                }
                self.error(&at, format!("in {what}: {msg}"));
                None
            }
        }
    }
}

fn name(s: &'static str) -> Key {
    Key::Name(s)
}

/// Parses and validates a configuration. `file` names it in errors; relative paths in it are
/// taken relative to the file's directory.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    let mut cx = Ctx {
        file,
        text,
        tree: None,
        errors: Vec::new(),
    };
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            cx.error_at(offset, format!("invalid TOML: {}", e.message().trim()));
            return Err(ConfigErrors(cx.errors));
        }
    };
    cx.tree = toml::from_str::<Node>(text).ok();
    let base = Path::new(file)
        .parent()
        .unwrap_or(Path::new(""))
        .to_path_buf();
    let rel = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };

    let mut gateway = raw::Gateway::default();
    let mut admin = raw::Admin::default();
    let mut storage = raw::Storage::default();
    let mut audit = raw::Audit::default();
    let mut raw_upstreams: Vec<Option<raw::Upstream>> = Vec::new();
    let mut raw_routes: Vec<Option<raw::Route>> = Vec::new();
    let mut raw_limits: Vec<(String, Option<raw::Limit>)> = Vec::new();
    let mut raw_consumers: Vec<Option<raw::Consumer>> = Vec::new();
    let mut raw_jwt: Vec<(String, Option<raw::Jwt>)> = Vec::new();
    let mut raw_introspection: Vec<(String, Option<raw::Introspection>)> = Vec::new();

    for (key, value) in table {
        match key.as_str() {
            "gateway" => gateway = cx.section(value, &[name("gateway")], "[gateway]").unwrap_or_default(),
            "admin" => admin = cx.section(value, &[name("admin")], "[admin]").unwrap_or_default(),
            "storage" => storage = cx.section(value, &[name("storage")], "[storage]").unwrap_or_default(),
            "audit" => audit = cx.section(value, &[name("audit")], "[audit]").unwrap_or_default(),
            "upstreams" | "routes" | "consumers" => {
                let section: &'static str = match key.as_str() {
                    "upstreams" => "upstreams",
                    "routes" => "routes",
                    _ => "consumers",
                };
                let toml::Value::Array(items) = value else {
                    cx.error(&[name(section)], format!("`{section}` must be an array of tables: write [[{section}]]"));
                    continue;
                };
                for (i, item) in items.into_iter().enumerate() {
                    let path = [name(section), Key::Index(i)];
                    let what = format!("[[{section}]] #{}", i + 1);
                    match section {
                        "upstreams" => raw_upstreams.push(cx.section(item, &path, &what)),
                        "routes" => raw_routes.push(cx.section(item, &path, &what)),
                        _ => raw_consumers.push(cx.section(item, &path, &what)),
                    }
                }
            }
            "limits" => {
                let toml::Value::Table(items) = value else {
                    cx.error(&[name("limits")], "`limits` must be a table of named limits: write [limits.NAME]");
                    continue;
                };
                for (lname, item) in items {
                    let path = [name("limits"), Key::Owned(lname.clone())];
                    let parsed = cx.section(item, &path, &format!("[limits.{lname}]"));
                    raw_limits.push((lname, parsed));
                }
            }
            "jwt" => {
                let toml::Value::Table(items) = value else {
                    cx.error(&[name("jwt")], "`jwt` must be a table of named issuers: write [jwt.NAME]");
                    continue;
                };
                for (jname, item) in items {
                    let path = [name("jwt"), Key::Owned(jname.clone())];
                    let parsed = cx.section(item, &path, &format!("[jwt.{jname}]"));
                    raw_jwt.push((jname, parsed));
                }
            }
            "introspection" => {
                let toml::Value::Table(items) = value else {
                    cx.error(&[name("introspection")], "`introspection` must be a table of named endpoints: write [introspection.NAME]");
                    continue;
                };
                for (iname, item) in items {
                    let path = [name("introspection"), Key::Owned(iname.clone())];
                    let parsed = cx.section(item, &path, &format!("[introspection.{iname}]"));
                    raw_introspection.push((iname, parsed));
                }
            }
            other => cx.error(
                &[Key::Owned(other.to_string())],
                format!("unknown section `{other}`: expected gateway, admin, storage, audit, upstreams, routes, limits, consumers, jwt or introspection"),
            ),
        }
    }

    // [gateway]
    let g = |k: &'static str| [name("gateway"), name(k)];
    let listen = addr(
        &mut cx,
        gateway.listen.as_deref(),
        "127.0.0.1:8080",
        &g("listen"),
    );
    let tls = gateway.tls.as_ref().map(|t| {
        let at_auth = [name("gateway"), name("tls"), name("client_auth")];
        let client_auth = one_of(
            &mut cx,
            &at_auth,
            t.client_auth.as_deref(),
            ("optional", ClientAuth::Optional),
            ("required", ClientAuth::Required),
        );
        if t.client_auth.is_some() && t.client_ca.is_none() {
            cx.error(
                &at_auth,
                "client_auth needs client_ca: the CA certificates (PEM) that client certificates are verified against",
            );
        }
        if t.client_ca.as_deref() == Some("") {
            cx.error(
                &[name("gateway"), name("tls"), name("client_ca")],
                "client_ca must name a PEM file",
            );
        }
        TlsConfig {
            cert: rel(&t.cert),
            key: rel(&t.key),
            client_ca: t.client_ca.as_deref().map(rel),
            client_auth,
            reload_interval: positive(
                &mut cx,
                t.reload_interval.as_deref(),
                "5s",
                &[name("gateway"), name("tls"), name("reload_interval")],
            ),
        }
    });
    let mut trusted_proxies = Vec::new();
    for (i, p) in gateway.trusted_proxies.iter().enumerate() {
        match IpNet::parse(p) {
            Ok(n) => trusted_proxies.push(n),
            Err(e) => cx.error(
                &[name("gateway"), name("trusted_proxies"), Key::Index(i)],
                e,
            ),
        }
    }
    let max_body_size = size(
        &mut cx,
        gateway.max_body_size.as_ref(),
        10 << 20,
        &g("max_body_size"),
    );
    let max_header_size = size(
        &mut cx,
        gateway.max_header_size.as_ref(),
        32 << 10,
        &g("max_header_size"),
    );
    if max_header_size < 1024 {
        cx.error(
            &g("max_header_size"),
            "max_header_size must be at least 1KiB",
        );
    }
    let encoded_slashes = one_of(
        &mut cx,
        &g("encoded_slashes"),
        gateway.encoded_slashes.as_deref(),
        ("reject", EncodedSlashes::Reject),
        ("keep", EncodedSlashes::Keep),
    );
    let path_parameters = one_of(
        &mut cx,
        &g("path_parameters"),
        gateway.path_parameters.as_deref(),
        ("reject", PathParameters::Reject),
        ("keep", PathParameters::Keep),
    );
    let shutdown_timeout = duration(
        &mut cx,
        gateway.shutdown_timeout.as_deref(),
        "30s",
        &g("shutdown_timeout"),
    );
    let idle_timeout = duration(
        &mut cx,
        gateway.idle_timeout.as_deref(),
        "30s",
        &g("idle_timeout"),
    );
    if idle_timeout < Duration::from_secs(1) {
        cx.error(
            &g("idle_timeout"),
            "idle_timeout must be at least 1s (idle connections are checked once a second)",
        );
    }
    let body_timeout = positive(
        &mut cx,
        gateway.body_timeout.as_deref(),
        "60s",
        &g("body_timeout"),
    );
    let worker_threads = match gateway.worker_threads {
        Some(0) => {
            cx.error(&g("worker_threads"), "worker_threads must be at least 1");
            None
        }
        Some(n) if n > 1024 => {
            cx.error(&g("worker_threads"), "worker_threads must be at most 1024");
            None
        }
        n => n.map(|n| n as usize),
    };
    let max_connections = match gateway.max_connections {
        Some(0) => {
            cx.error(&g("max_connections"), "max_connections must be at least 1");
            1
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => 10_000,
    };

    // [admin], [storage], [audit]
    let admin_listen = addr(
        &mut cx,
        admin.listen.as_deref(),
        "127.0.0.1:9090",
        &[name("admin"), name("listen")],
    );
    let mut admin_tokens = Vec::new();
    for (tname, t) in admin.tokens.iter().flatten() {
        let at = |k: &'static str| {
            [
                name("admin"),
                name("tokens"),
                Key::Owned(tname.clone()),
                name(k),
            ]
        };
        let role = match t.role.as_str() {
            "admin" => AdminRole::Admin,
            "auditor" => AdminRole::Auditor,
            other => {
                cx.error(
                    &at("role"),
                    format!(
                        "role {other:?}: use \"admin\" (read and write) or \"auditor\" (read only)"
                    ),
                );
                AdminRole::Auditor
            }
        };
        if let Some(secret) = secret_source(&mut cx, &t.secret, &rel, &at("secret")) {
            admin_tokens.push(AdminToken {
                name: tname.clone(),
                role,
                secret,
            });
        }
    }
    let durability = match audit.durability.as_deref() {
        None | Some("strict") => Durability::Strict,
        Some("batched") => Durability::Batched,
        Some("async") => Durability::Async,
        Some(other) => {
            cx.error(
                &[name("audit"), name("durability")],
                format!("durability must be \"strict\", \"batched\" or \"async\", not {other:?}"),
            );
            Durability::Strict
        }
    };
    let hmac_headers: Vec<String> = audit
        .hmac_headers
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    for (i, h) in hmac_headers.iter().enumerate() {
        let at = [name("audit"), name("hmac_headers"), Key::Index(i)];
        if matches!(
            h.as_str(),
            "authorization" | "cookie" | "x-api-key" | "proxy-authorization"
        ) {
            cx.error(&at, format!("{h:?} is a credential: it is never recorded, not even as an HMAC (a hash of a secret can be guessed offline)"));
        } else if !http_token(h) {
            cx.error(&at, format!("{h:?} is not a header name"));
        }
    }
    let encryption_key = audit
        .encryption_key
        .as_deref()
        .and_then(|v| secret_source(&mut cx, v, &rel, &[name("audit"), name("encryption_key")]));
    let strict_timeout = positive(
        &mut cx,
        audit.strict_timeout.as_deref(),
        "5s",
        &[name("audit"), name("strict_timeout")],
    );
    let checkpoint_interval = positive(
        &mut cx,
        audit.checkpoint_interval.as_deref(),
        "1s",
        &[name("audit"), name("checkpoint_interval")],
    );
    let segment_size = size(
        &mut cx,
        audit.segment_size.as_ref(),
        64 << 20,
        &[name("audit"), name("segment_size")],
    );
    if segment_size < 1024 {
        cx.error(
            &[name("audit"), name("segment_size")],
            "segment_size must be at least 1KiB",
        );
    } else if segment_size > 1 << 31 {
        // The search index keeps 32-bit offsets; a segment is sealed once past this size, so
        // its last record still begins below 4 GiB.
        cx.error(
            &[name("audit"), name("segment_size")],
            "segment_size must be at most 2GiB",
        );
    }
    let segment_max_age = positive(
        &mut cx,
        audit.segment_max_age.as_deref(),
        "1d",
        &[name("audit"), name("segment_max_age")],
    );
    let retention = audit
        .retention
        .as_deref()
        .map(|r| positive(&mut cx, Some(r), r, &[name("audit"), name("retention")]));
    let mut export_cursors: Vec<String> = Vec::new();
    for (i, c) in audit.retention_requires_export.iter().enumerate() {
        let at = [
            name("audit"),
            name("retention_requires_export"),
            Key::Index(i),
        ];
        let valid = !c.is_empty()
            && c.len() <= 64
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if !valid {
            cx.error(&at, format!("{c:?} is not an export cursor name: use letters, digits, '_' and '-' (up to 64), as given to `audit export --cursor`"));
        } else if export_cursors.contains(c) {
            cx.error(&at, format!("cursor {c:?} is listed twice"));
        } else {
            export_cursors.push(c.clone());
        }
    }

    // [[upstreams]]
    let mut upstreams = Vec::new();
    let mut upstream_index = std::collections::HashMap::new();
    for (i, u) in raw_upstreams.iter().enumerate() {
        let Some(u) = u else { continue };
        let at = |k: &'static str| [name("upstreams"), Key::Index(i), name(k)];
        if upstream_index
            .insert(u.name.clone(), upstreams.len())
            .is_some()
        {
            cx.error(
                &at("name"),
                format!("upstream name {:?} is used twice", u.name),
            );
        }
        let mut targets = Vec::new();
        match (&u.url, &u.targets) {
            (Some(url), None) => {
                if let Some(t) = target(&mut cx, url, &at("url")) {
                    targets.push(t);
                }
            }
            (None, Some(list)) if !list.is_empty() => {
                for (j, url) in list.iter().enumerate() {
                    if let Some(t) = target(
                        &mut cx,
                        url,
                        &[
                            name("upstreams"),
                            Key::Index(i),
                            name("targets"),
                            Key::Index(j),
                        ],
                    ) {
                        targets.push(t);
                    }
                }
            }
            (Some(_), Some(_)) => cx.error(
                &at("targets"),
                format!(
                    "upstream {:?}: give either `url` or `targets`, not both",
                    u.name
                ),
            ),
            _ => cx.error(
                &[name("upstreams"), Key::Index(i)],
                format!("upstream {:?} needs `url` or a non-empty `targets`", u.name),
            ),
        }
        let failure_threshold = u.failure_threshold.unwrap_or(5);
        if failure_threshold == 0 {
            cx.error(
                &at("failure_threshold"),
                "failure_threshold must be at least 1",
            );
        }
        upstreams.push(UpstreamConfig {
            name: u.name.clone(),
            targets,
            connect_timeout: positive(
                &mut cx,
                u.connect_timeout.as_deref(),
                "5s",
                &at("connect_timeout"),
            ),
            timeout: positive(&mut cx, u.timeout.as_deref(), "30s", &at("timeout")),
            failure_threshold: failure_threshold.max(1),
            cooldown: duration(&mut cx, u.cooldown.as_deref(), "10s", &at("cooldown")),
            max_idle: u
                .max_idle
                .map_or(128, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            idle_timeout: {
                let t = duration(
                    &mut cx,
                    u.idle_timeout.as_deref(),
                    "60s",
                    &at("idle_timeout"),
                );
                if t < Duration::from_secs(1) {
                    cx.error(
                        &at("idle_timeout"),
                        "idle_timeout must be at least 1s (idle connections are checked once a second)",
                    );
                }
                t
            },
        });
    }

    // [storage] (Redis settings; the limits below depend on them)
    let st = |k: &'static str| [name("storage"), name(k)];
    if let Some(url) = &storage.redis {
        if !url.starts_with("redis://") {
            cx.error(
                &st("redis"),
                format!(
                    "redis must be a redis://host[:port][/db] URL, not {:?}",
                    redact_url(url)
                ),
            );
        }
    }
    let redis_timeout = positive(
        &mut cx,
        storage.redis_timeout.as_deref(),
        "100ms",
        &st("redis_timeout"),
    );
    let limit_keys = match storage.limit_keys {
        None => 1_000_000,
        Some(0) => {
            cx.error(&st("limit_keys"), "limit_keys must be at least 1");
            1
        }
        Some(n) if n > 100_000_000 => {
            cx.error(
                &st("limit_keys"),
                "limit_keys must be at most 100000000 (about 4 GB)",
            );
            100_000_000
        }
        Some(n) => n,
    };
    let redis_prefix = storage
        .redis_prefix
        .clone()
        .unwrap_or_else(|| "apiwarden".into());
    let data_dir = rel(storage.data_dir.as_deref().unwrap_or("./apiwarden-data"));
    let pepper = match storage.pepper.as_deref() {
        None => SecretSource::Generated(data_dir.join("pepper")),
        Some(v) => secret_source(&mut cx, v, &rel, &st("pepper"))
            .unwrap_or_else(|| SecretSource::Generated(data_dir.join("pepper"))),
    };
    let key_max_age = positive(
        &mut cx,
        storage.key_max_age.as_deref(),
        "90d",
        &st("key_max_age"),
    );
    let key_unused_after = positive(
        &mut cx,
        storage.key_unused_after.as_deref(),
        "30d",
        &st("key_unused_after"),
    );

    // [limits.NAME]
    let mut limits = BTreeMap::new();
    for (lname, l) in &raw_limits {
        let Some(l) = l else { continue };
        let at = |k: &'static str| [name("limits"), Key::Owned(lname.clone()), name(k)];
        let (requests, per) = match parse_rate(&l.rate) {
            Ok(r) => r,
            Err(e) => {
                cx.error(&at("rate"), e);
                (1, Duration::from_secs(1))
            }
        };
        let parts: Vec<&str> = match &l.key {
            None => vec!["ip"],
            Some(raw::OneOrMany::One(k)) => vec![k.as_str()],
            Some(raw::OneOrMany::Many(ks)) => ks.iter().map(String::as_str).collect(),
        };
        if parts.is_empty() {
            cx.error(
                &at("key"),
                "key must name at least one of consumer, key, ip, route or header:NAME",
            );
        }
        let mut key = Vec::new();
        for part in parts {
            let k = match part {
                "ip" => LimitKey::Ip,
                "consumer" => LimitKey::Consumer,
                "key" => LimitKey::Key,
                "route" => LimitKey::Route,
                h if h.starts_with("header:") && h.len() > 7 => match http_token(&h[7..]) {
                    true => LimitKey::Header(h[7..].to_ascii_lowercase()),
                    false => {
                        cx.error(
                            &at("key"),
                            format!("{h:?}: a header name is letters, digits and -"),
                        );
                        continue;
                    }
                },
                other => {
                    cx.error(
                        &at("key"),
                        format!(
                            "limit key must be consumer, key, ip, route or header:NAME, not {other:?}"
                        ),
                    );
                    continue;
                }
            };
            if key.contains(&k) {
                cx.error(&at("key"), format!("key part {part:?} is listed twice"));
                continue;
            }
            key.push(k);
        }
        let burst = match l.burst {
            None => requests,
            Some(0) => {
                cx.error(
                    &at("burst"),
                    "burst must be at least 1 (the number of requests that may arrive at once)",
                );
                1
            }
            Some(b) => b,
        };
        if per.as_nanos() / u128::from(requests) * u128::from(burst)
            > 10 * 365 * 86_400 * 1_000_000_000
        {
            cx.error(
                &at("burst"),
                format!(
                    "burst {burst} at {:?} takes more than ten years to refill; lower it",
                    l.rate
                ),
            );
        }
        if per.as_nanos() / u128::from(requests) < 1_000 {
            cx.error(
                &at("rate"),
                format!(
                    "rate {:?} is more than one request per microsecond; that is not a limit",
                    l.rate
                ),
            );
        }
        let store = match l.store.as_deref() {
            None if storage.redis.is_some() => LimitStore::Redis,
            None | Some("local") => LimitStore::Local,
            Some("redis") => {
                if storage.redis.is_none() {
                    cx.error(
                        &at("store"),
                        "store = \"redis\" needs storage.redis (the Redis URL)",
                    );
                }
                LimitStore::Redis
            }
            Some(other) => {
                cx.error(
                    &at("store"),
                    format!("store must be \"local\" or \"redis\", not {other:?}"),
                );
                LimitStore::Local
            }
        };
        let failure_mode = one_of(
            &mut cx,
            &at("failure_mode"),
            l.failure_mode.as_deref(),
            ("open", FailureMode::Open),
            ("closed", FailureMode::Closed),
        );
        limits.insert(
            lname.clone(),
            LimitConfig {
                requests,
                per,
                burst,
                key,
                store,
                failure_mode,
            },
        );
    }

    // [[consumers]]
    let mut consumers = Vec::new();
    let mut consumer_names = HashSet::new();
    // Certificate name (DNS names compared without case) → the consumer it belongs to.
    let mut cert_names: BTreeMap<String, String> = BTreeMap::new();
    for (i, c) in raw_consumers.iter().enumerate() {
        let Some(c) = c else { continue };
        if !consumer_names.insert(c.name.clone()) {
            cx.error(
                &[name("consumers"), Key::Index(i), name("name")],
                format!("consumer name {:?} is used twice", c.name),
            );
        }
        for (j, sc) in c.scopes.iter().enumerate() {
            if !scope_name(sc) {
                cx.error(
                    &[
                        name("consumers"),
                        Key::Index(i),
                        name("scopes"),
                        Key::Index(j),
                    ],
                    format!("scope {sc:?} must be printable and without spaces"),
                );
            }
        }
        let allow_ips = c.allow_ips.as_ref().map(|list| {
            list.iter()
                .enumerate()
                .filter_map(|(j, v)| match IpNet::parse(v) {
                    Ok(n) => Some(n.canonical()),
                    Err(e) => {
                        cx.error(
                            &[
                                name("consumers"),
                                Key::Index(i),
                                name("allow_ips"),
                                Key::Index(j),
                            ],
                            e,
                        );
                        None
                    }
                })
                .collect()
        });
        for (j, n) in c.certificate_names.iter().enumerate() {
            let at = [
                name("consumers"),
                Key::Index(i),
                name("certificate_names"),
                Key::Index(j),
            ];
            if n.is_empty() || n.chars().any(char::is_control) || n.trim() != n {
                cx.error(
                    &at,
                    format!("certificate name {n:?} must be a non-empty SAN or CN without control characters or surrounding spaces"),
                );
                continue;
            }
            if let Some(owner) = cert_names.insert(n.to_ascii_lowercase(), c.name.clone()) {
                cx.error(
                    &at,
                    format!("certificate name {n:?} is already given to consumer {owner:?}: a certificate must identify one consumer only"),
                );
            }
        }
        consumers.push(ConsumerConfig {
            name: c.name.clone(),
            scopes: c.scopes.clone(),
            roles: c.roles.clone(),
            allow_ips,
            certificate_names: c.certificate_names.clone(),
            metadata: c.metadata.clone(),
            token_issuers: c.token_issuers.clone(),
        });
    }

    // [jwt.NAME]
    let mut jwt = BTreeMap::new();
    for (jname, j) in &raw_jwt {
        let Some(j) = j else { continue };
        let at = |k: &'static str| [name("jwt"), Key::Owned(jname.clone()), name(k)];
        let keys = match (&j.jwks_url, &j.secret) {
            (Some(_), Some(_)) => {
                cx.error(&at("secret"), format!("[jwt.{jname}]: give `jwks_url` (or neither, for OIDC discovery) or `secret` (HS256), not both"));
                JwtKeySource::Discovery
            }
            (Some(url), None) => {
                if let Err(e) = fetch_url(url) {
                    cx.error(&at("jwks_url"), e);
                }
                JwtKeySource::JwksUrl(url.clone())
            }
            (None, Some(v)) => secret_source(&mut cx, v, &rel, &at("secret"))
                .map_or(JwtKeySource::Discovery, JwtKeySource::Secret),
            (None, None) => {
                if let Err(e) = fetch_url(&j.issuer) {
                    cx.error(&at("issuer"), format!("{e} (OIDC discovery fetches {}/.well-known/openid-configuration; give `jwks_url` or `secret` otherwise)", j.issuer.trim_end_matches('/')));
                }
                JwtKeySource::Discovery
            }
        };
        if j.issuer.is_empty() {
            cx.error(
                &at("issuer"),
                "issuer must be the exact `iss` value of the tokens",
            );
        }
        if j.audiences.is_empty() {
            cx.error(&[name("jwt"), Key::Owned(jname.clone())], format!("[jwt.{jname}] needs `audiences`: the `aud` values this gateway accepts, so that a token made for another service is refused"));
        }
        let hmac = matches!(keys, JwtKeySource::Secret(_));
        let algorithms = match &j.algorithms {
            None if hmac => vec![JwtAlg::Hs256],
            None => vec![JwtAlg::Rs256, JwtAlg::Ps256, JwtAlg::Es256, JwtAlg::EdDsa],
            Some(list) => {
                if list.is_empty() {
                    cx.error(
                        &at("algorithms"),
                        "algorithms is empty: no token could ever be accepted",
                    );
                }
                list.iter()
                    .enumerate()
                    .filter_map(|(k, a)| {
                        let path = [name("jwt"), Key::Owned(jname.clone()), name("algorithms"), Key::Index(k)];
                        match JwtAlg::parse(a) {
                            None => {
                                cx.error(&path, format!("{a:?} is not supported: use RS256, PS256, ES256, EdDSA or (with `secret`) HS256"));
                                None
                            }
                            Some(JwtAlg::Hs256) if !hmac => {
                                cx.error(&path, "HS256 needs a shared secret: it is accepted only from an issuer that names one with `secret`, never with a JWKS (an RSA or EC public key must not double as an HMAC key)");
                                None
                            }
                            Some(alg) if hmac && alg != JwtAlg::Hs256 => {
                                cx.error(&path, format!("{a} needs the issuer's public keys (`jwks_url` or discovery); an issuer with `secret` accepts HS256 only"));
                                None
                            }
                            Some(alg) => Some(alg),
                        }
                    })
                    .collect()
            }
        };
        let leeway = duration(&mut cx, j.leeway.as_deref(), "30s", &at("leeway"));
        if leeway > Duration::from_secs(300) {
            cx.error(
                &at("leeway"),
                "leeway must be at most 5m: it lets expired tokens through for that long",
            );
        }
        let refresh = positive(&mut cx, j.refresh.as_deref(), "15m", &at("refresh"));
        let min_refresh = positive(&mut cx, j.min_refresh.as_deref(), "10s", &at("min_refresh"));
        if min_refresh > refresh {
            cx.error(
                &at("min_refresh"),
                "min_refresh must not be longer than refresh",
            );
        }
        let timeout = positive(&mut cx, j.timeout.as_deref(), "5s", &at("timeout"));
        if hmac && (j.ca.is_some() || j.refresh.is_some() || j.min_refresh.is_some()) {
            cx.error(&[name("jwt"), Key::Owned(jname.clone())], format!("[jwt.{jname}]: `ca`, `refresh` and `min_refresh` are about fetching keys; an issuer with `secret` fetches none"));
        }
        jwt.insert(
            jname.clone(),
            JwtConfig {
                issuer: j.issuer.clone(),
                keys,
                audiences: j.audiences.clone(),
                algorithms,
                leeway,
                refresh,
                min_refresh,
                timeout,
                ca: j.ca.as_deref().map(rel),
            },
        );
    }

    // [introspection.NAME]
    let mut introspection = BTreeMap::new();
    for (iname, t) in &raw_introspection {
        let Some(t) = t else { continue };
        let at = |k: &'static str| [name("introspection"), Key::Owned(iname.clone()), name(k)];
        if let Err(e) = fetch_url(&t.url) {
            cx.error(&at("url"), e);
        }
        if t.client_id.is_empty() {
            cx.error(
                &at("client_id"),
                "client_id must be the gateway's client id at the authorization server",
            );
        }
        let client_secret = secret_source(&mut cx, &t.client_secret, &rel, &at("client_secret"));
        if t.audiences.iter().any(String::is_empty) {
            cx.error(&at("audiences"), "an audience must not be empty");
        }
        if t.issuer.as_deref() == Some("") {
            cx.error(
                &at("issuer"),
                "issuer must be the exact `iss` value of the tokens (or left out)",
            );
        }
        let cache_ttl = positive(&mut cx, t.cache_ttl.as_deref(), "60s", &at("cache_ttl"));
        if cache_ttl > Duration::from_secs(3600) {
            cx.error(&at("cache_ttl"), "cache_ttl must be at most 1h: a token revoked at the server stays accepted for that long");
        }
        let negative_cache_ttl = positive(
            &mut cx,
            t.negative_cache_ttl.as_deref(),
            "5s",
            &at("negative_cache_ttl"),
        );
        if negative_cache_ttl > Duration::from_secs(300) {
            cx.error(&at("negative_cache_ttl"), "negative_cache_ttl must be at most 5m: a token that becomes valid is refused for that long");
        }
        let timeout = positive(&mut cx, t.timeout.as_deref(), "2s", &at("timeout"));
        if let Some(client_secret) = client_secret {
            introspection.insert(
                iname.clone(),
                IntrospectionConfig {
                    url: t.url.clone(),
                    client_id: t.client_id.clone(),
                    client_secret,
                    audiences: t.audiences.clone(),
                    issuer: t.issuer.clone(),
                    cache_ttl,
                    negative_cache_ttl,
                    timeout,
                    ca: t.ca.as_deref().map(rel),
                },
            );
        }
    }

    for (i, c) in consumers.iter().enumerate() {
        for (j, t) in c.token_issuers.iter().enumerate() {
            if !jwt.contains_key(t) && !introspection.contains_key(t) {
                cx.error(
                    &[name("consumers"), Key::Index(i), name("token_issuers"), Key::Index(j)],
                    format!("consumer {:?}: {t:?} is neither a [jwt.{t}] nor an [introspection.{t}] table", c.name),
                );
            }
        }
    }

    // [[routes]]
    let mut routes = Vec::new();
    let mut route_names = HashSet::new();
    for (i, r) in raw_routes.iter().enumerate() {
        let Some(r) = r else { continue };
        let at = |k: &'static str| [name("routes"), Key::Index(i), name(k)];
        if !route_names.insert(r.name.clone()) {
            cx.error(
                &at("name"),
                format!("route name {:?} is used twice", r.name),
            );
        }
        if let Some(h) = r.host.as_deref() {
            let name_part = h.strip_prefix("*.").unwrap_or(h);
            let ok = !name_part.is_empty()
                && name_part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
                && !name_part.starts_with('.');
            if !ok {
                cx.error(&at("host"), format!("host {h:?} must be a host name such as \"api.example.com\" or \"*.example.com\", without port or path"));
            }
        }
        let host = r.host.as_deref().map(|h| {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(rest) if rest.starts_with('.') => HostMatch::Suffix(rest.to_string()),
                _ => HostMatch::Exact(h),
            }
        });
        let (path, path_text) = match (&r.path, &r.path_prefix) {
            (Some(p), None) => (
                route_path(&mut cx, p, false, path_parameters, &at("path")),
                p.clone(),
            ),
            (None, Some(p)) => (
                route_path(&mut cx, p, true, path_parameters, &at("path_prefix")),
                p.clone(),
            ),
            (Some(_), Some(_)) => {
                cx.error(
                    &at("path_prefix"),
                    format!(
                        "route {:?}: give either `path` or `path_prefix`, not both",
                        r.name
                    ),
                );
                (PathMatch::Prefix("/".into()), String::new())
            }
            (None, None) => {
                cx.error(
                    &[name("routes"), Key::Index(i)],
                    format!("route {:?} needs `path` or `path_prefix`", r.name),
                );
                (PathMatch::Prefix("/".into()), String::new())
            }
        };
        if r.methods.as_ref().is_some_and(|m| m.is_empty()) {
            cx.error(&at("methods"), format!("route {:?}: `methods` is empty, so the route never matches; leave it out to match every method", r.name));
        }
        let methods = r.methods.as_ref().map(|ms| {
            ms.iter()
                .enumerate()
                .map(|(j, m)| {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                        cx.error(
                            &[
                                name("routes"),
                                Key::Index(i),
                                name("methods"),
                                Key::Index(j),
                            ],
                            format!("{m:?} is not an HTTP method"),
                        );
                    }
                    m.to_ascii_uppercase()
                })
                .collect::<Vec<_>>()
        });
        let upstream = match upstream_index.get(&r.upstream) {
            Some(&idx) => idx,
            None => {
                cx.error(
                    &at("upstream"),
                    format!(
                        "route {:?}: upstream {:?} is not defined in [[upstreams]]",
                        r.name, r.upstream
                    ),
                );
                0
            }
        };
        let mut auth = Vec::new();
        match &r.auth {
            None => cx.error(
                &[name("routes"), Key::Index(i)],
                format!("route {:?} has no `auth`: name the accepted methods, or write auth = [\"none\"] for an open route", r.name),
            ),
            Some(list) if list.is_empty() => cx.error(&at("auth"), format!("route {:?}: `auth` is empty; write auth = [\"none\"] for an open route", r.name)),
            Some(list) => {
                for (j, m) in list.iter().enumerate() {
                    let method = match m.as_str() {
                        "none" => AuthMethod::None,
                        "api_key" => AuthMethod::ApiKey,
                        "jwt" => AuthMethod::Jwt,
                        "introspection" => AuthMethod::Introspection,
                        "mtls" => AuthMethod::Mtls,
                        other => {
                            cx.error(
                                &[name("routes"), Key::Index(i), name("auth"), Key::Index(j)],
                                format!("unknown auth method {other:?}: use api_key, jwt, introspection, mtls or none"),
                            );
                            continue;
                        }
                    };
                    auth.push(method);
                }
                if auth.contains(&AuthMethod::None) && auth.len() > 1 {
                    cx.error(&at("auth"), format!("route {:?}: \"none\" cannot be combined with other methods", r.name));
                }
                if auth == [AuthMethod::None] && !r.scopes.is_empty() {
                    cx.error(&at("scopes"), format!("route {:?}: scopes need an authenticated caller, but auth is [\"none\"]", r.name));
                }
                if auth == [AuthMethod::None] && !r.roles.is_empty() {
                    cx.error(&at("roles"), format!("route {:?}: roles need an authenticated caller, but auth is [\"none\"]", r.name));
                }
            }
        }
        if r.limits.len() > 8 {
            cx.error(
                &[name("routes"), Key::Index(i), name("limits")],
                format!(
                    "route {:?} stacks {} limits; at most 8",
                    r.name,
                    r.limits.len()
                ),
            );
        }
        let api_key_query = r.api_key_query.clone();
        if let Some(q) = &api_key_query {
            if !auth.contains(&AuthMethod::ApiKey) {
                cx.error(
                    &at("api_key_query"),
                    format!(
                        "route {:?}: `api_key_query` needs \"api_key\" in `auth`",
                        r.name
                    ),
                );
            }
            if q.is_empty()
                || !q
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            {
                cx.error(&at("api_key_query"), format!("route {:?}: `api_key_query` must be a parameter name of letters, digits, `_`, `-` or `.`", r.name));
            }
        }
        let route_jwt = route_table(
            &mut cx,
            &r.name,
            ("jwt", "issuer"),
            &r.jwt,
            auth.contains(&AuthMethod::Jwt),
            &jwt,
            (&at("jwt"), &at("auth")),
        );
        let route_introspection = route_table(
            &mut cx,
            &r.name,
            ("introspection", "endpoint"),
            &r.introspection,
            auth.contains(&AuthMethod::Introspection),
            &introspection,
            (&at("introspection"), &at("auth")),
        );
        for (j, l) in r.limits.iter().enumerate() {
            if r.limits[..j].contains(l) {
                cx.error(
                    &[name("routes"), Key::Index(i), name("limits"), Key::Index(j)],
                    format!("route {:?}: limit {l:?} is listed twice", r.name),
                );
            }
            if !limits.contains_key(l) {
                cx.error(
                    &[name("routes"), Key::Index(i), name("limits"), Key::Index(j)],
                    format!(
                        "route {:?}: limit {l:?} is not defined; add a [limits.{l}] table",
                        r.name
                    ),
                );
            }
        }
        routes.push(RouteConfig {
            name: r.name.clone(),
            host,
            path,
            path_text,
            methods,
            upstream,
            auth,
            scopes: r.scopes.clone(),
            roles: r.roles.clone(),
            limits: r.limits.clone(),
            jwt: route_jwt,
            introspection: route_introspection,
            api_key_query,
            audit_failure: match r.audit_failure.as_deref() {
                None | Some("closed") => FailureMode::Closed,
                Some("open") => FailureMode::Open,
                Some(other) => {
                    cx.error(
                        &at("audit_failure"),
                        format!(
                            "route {:?}: audit_failure {other:?}: use \"closed\" or \"open\"",
                            r.name
                        ),
                    );
                    FailureMode::Closed
                }
            },
        });
    }
    // A credential in the query string is never recorded, not even as an HMAC: the API key
    // parameter of any route, and the usual names of tokens and passwords.
    for (i, q) in audit.hmac_query.iter().enumerate() {
        let at = [name("audit"), name("hmac_query"), Key::Index(i)];
        let lower = q.to_ascii_lowercase();
        if routes
            .iter()
            .any(|r| r.api_key_query.as_deref() == Some(q.as_str()))
        {
            cx.error(&at, format!("{q:?} is a route's `api_key_query`: API keys are never recorded, not even as an HMAC"));
        } else if matches!(
            lower.as_str(),
            "access_token"
                | "id_token"
                | "refresh_token"
                | "client_secret"
                | "api_key"
                | "apikey"
                | "password"
                | "passwd"
        ) {
            cx.error(&at, format!("{q:?} names a credential: it is never recorded, not even as an HMAC (a hash of a password can be guessed offline)"));
        }
    }

    if !cx.errors.is_empty() {
        cx.errors.sort_by_key(|e| (e.line, e.column));
        return Err(ConfigErrors(cx.errors));
    }
    Ok(Config {
        gateway: GatewayConfig {
            listen,
            tls,
            trusted_proxies,
            max_body_size,
            max_header_size: usize::try_from(max_header_size).unwrap_or(usize::MAX),
            encoded_slashes,
            path_parameters,
            shutdown_timeout,
            idle_timeout,
            body_timeout,
            node: gateway.node.clone(),
            worker_threads,
            max_connections,
            h2c: gateway.h2c.unwrap_or(false),
        },
        admin: AdminConfig {
            listen: admin_listen,
            tokens: admin_tokens,
        },
        storage: StorageConfig {
            data_dir,
            database: storage.database.clone(),
            redis: storage.redis.clone(),
            redis_prefix,
            redis_timeout,
            limit_keys,
            pepper,
            key_max_age,
            key_unused_after,
        },
        audit: AuditConfig {
            durability,
            strict_timeout,
            checkpoint_interval,
            checkpoint_copy: audit.checkpoint_copy.as_deref().map(rel),
            hmac_headers: hmac_headers.clone(),
            hmac_query: audit.hmac_query.clone(),
            encryption_key,
            segment_size,
            segment_max_age,
            retention,
            retention_requires_export: export_cursors,
        },
        upstreams,
        routes,
        limits,
        consumers,
        jwt,
        introspection,
    })
}

/// The `[KIND.NAME]` table a route uses for an auth method (`jwt`, `introspection`): the one it
/// names, or the only one there is. `kind` is the section and the route field, `noun` what a
/// table is called in errors.
fn route_table<V>(
    cx: &mut Ctx<'_>,
    route: &str,
    (kind, noun): (&str, &str),
    given: &Option<String>,
    accepts: bool,
    tables: &BTreeMap<String, V>,
    (field, auth): (&[Key], &[Key]),
) -> Option<String> {
    match (given, accepts) {
        (Some(n), true) if tables.contains_key(n) => Some(n.clone()),
        (Some(n), true) => {
            cx.error(
                field,
                format!("route {route:?}: {noun} {n:?} is not defined; add a [{kind}.{n}] table"),
            );
            None
        }
        (Some(_), false) => {
            cx.error(
                field,
                format!("route {route:?}: `{kind}` names an {noun}, but `auth` does not list \"{kind}\""),
            );
            None
        }
        (None, true) if tables.len() == 1 => tables.keys().next().cloned(),
        (None, true) => {
            cx.error(
                auth,
                format!(
                    "route {route:?} accepts {kind}: name the {noun} with {kind} = \"NAME\" ({})",
                    if tables.is_empty() {
                        format!("and define it in a [{kind}.NAME] table")
                    } else {
                        format!(
                            "one of {}",
                            tables.keys().cloned().collect::<Vec<_>>().join(", ")
                        )
                    }
                ),
            );
            None
        }
        (None, false) => None,
    }
}

/// A secret the config refers to: `env:NAME` or `file:PATH`, never the value itself.
fn secret_source(
    cx: &mut Ctx<'_>,
    v: &str,
    rel: &dyn Fn(&str) -> std::path::PathBuf,
    path: &[Key],
) -> Option<SecretSource> {
    match v.split_once(':') {
        Some(("env", name)) if !name.is_empty() => Some(SecretSource::Env(name.to_string())),
        Some(("file", p)) if !p.is_empty() => Some(SecretSource::File(rel(p))),
        _ => {
            // The value may be the secret itself: it is not repeated in the error.
            cx.error(
                path,
                "must be \"env:NAME\" or \"file:PATH\"; the secret itself never goes in the config file",
            );
            None
        }
    }
}

/// A URL keys may be fetched from: HTTPS, or plain HTTP on a loopback address only (a key set
/// fetched in the clear could be swapped by anyone on the path).
pub fn fetch_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("{:?} must be an https:// URL", redact_url(url)));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "{:?} must be an https:// URL (plain http is accepted for loopback addresses only)",
            redact_url(url)
        ))
    }
}

fn addr(cx: &mut Ctx<'_>, v: Option<&str>, default: &str, path: &[Key]) -> SocketAddr {
    let s = v.unwrap_or(default);
    s.parse().unwrap_or_else(|_| {
        cx.error(
            path,
            format!("{s:?} is not a socket address such as \"127.0.0.1:8080\""),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

fn duration(cx: &mut Ctx<'_>, v: Option<&str>, default: &str, path: &[Key]) -> Duration {
    match HumanDuration::parse(v.unwrap_or(default)) {
        Ok(d) if d.0 > Duration::from_secs(10 * 365 * 86400) => {
            cx.error(
                path,
                format!("{:?} is longer than ten years", v.unwrap_or(default)),
            );
            Duration::from_secs(1)
        }
        Ok(d) => d.0,
        Err(e) => {
            cx.error(path, e);
            Duration::from_secs(1)
        }
    }
}

/// A duration that must be above zero (a timeout or an interval).
fn positive(cx: &mut Ctx<'_>, v: Option<&str>, default: &str, path: &[Key]) -> Duration {
    let d = duration(cx, v, default, path);
    if d.is_zero() {
        cx.error(path, "must be longer than zero");
        return Duration::from_secs(1);
    }
    d
}

fn size(cx: &mut Ctx<'_>, v: Option<&raw::Size>, default: u64, path: &[Key]) -> u64 {
    match v {
        None => default,
        Some(raw::Size::Int(n)) => *n,
        Some(raw::Size::Str(s)) => ByteSize::parse(s).map(|b| b.0).unwrap_or_else(|e| {
            cx.error(path, e);
            default
        }),
    }
}

fn target(cx: &mut Ctx<'_>, url: &str, path: &[Key]) -> Option<Target> {
    if url.contains('@') {
        // Not echoed: the part before '@' may be a password.
        cx.error(
            path,
            "upstream URLs must not contain credentials (user:password@host)",
        );
        return None;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        let msg = if url.starts_with("https://") {
            format!(
                "{url:?}: https upstreams are not supported yet; use http:// on a private network"
            )
        } else {
            format!("{url:?} is not an upstream URL such as \"http://127.0.0.1:3000\"")
        };
        cx.error(path, msg);
        return None;
    };
    let (authority, base) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host_ok = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    // The base path is prefixed to already-normal paths, so it must be normal itself.
    let base_ok = base.is_empty()
        || base.bytes().all(|b| b.is_ascii_graphic())
            && normalize(base, PathRules::KEEP).is_ok_and(|n| n == base);
    if !host_ok || base.contains(['?', '#']) || !base_ok {
        cx.error(
            path,
            format!("{url:?} is not an upstream URL such as \"http://127.0.0.1:3000\""),
        );
        return None;
    }
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    // host:port, where host is a name, an IPv4 address or a bracketed IPv6 address.
    let valid = authority.rsplit_once(':').is_some_and(|(host, port)| {
        port.parse::<u16>().is_ok()
            && !host.is_empty()
            && (host.starts_with('[') && host.ends_with(']') || !host.contains(['[', ']', ':']))
    });
    if !valid {
        cx.error(
            path,
            format!("{url:?} is not an upstream URL such as \"http://127.0.0.1:3000\""),
        );
        return None;
    }
    Some(Target {
        authority,
        base_path: base.trim_end_matches('/').to_string(),
    })
}

/// A scope or role name: printable, no spaces (keys store them space-separated).
fn scope_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

/// An HTTP field name: a token (RFC 9110 section 5.6.2), as far as config files need.
fn http_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A setting that is one of two words, the first when it is absent. Anything else is an error
/// at `path` (whose last key names the setting) and counts as the first.
fn one_of<T: Copy>(
    cx: &mut Ctx<'_>,
    path: &[Key],
    value: Option<&str>,
    (first, a): (&str, T),
    (second, b): (&str, T),
) -> T {
    match value {
        None => a,
        Some(v) if v == first => a,
        Some(v) if v == second => b,
        Some(other) => {
            let setting = match path.last() {
                Some(Key::Name(n)) => n,
                _ => "the setting",
            };
            cx.error(
                path,
                format!("{setting} must be {first:?} or {second:?}, not {other:?}"),
            );
            a
        }
    }
}

fn parse_rate(s: &str) -> Result<(u64, Duration), String> {
    let err = || format!("rate {s:?} must look like \"100/s\" (units s, m, h, d)");
    let (n, unit) = s.split_once('/').ok_or_else(err)?;
    let n: u64 = n.trim().parse().map_err(|_| err())?;
    let per = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(err()),
    };
    if n == 0 {
        return Err(format!("rate {s:?} must allow at least one request"));
    }
    Ok((n, Duration::from_secs(per)))
}

fn route_path(
    cx: &mut Ctx<'_>,
    p: &str,
    prefix: bool,
    parameters: PathParameters,
    path: &[Key],
) -> PathMatch {
    let is_template = p.contains('{');
    if prefix && is_template {
        cx.error(
            path,
            format!("{p:?}: templates are allowed in `path`, not `path_prefix`"),
        );
    }
    if p.contains(['?', '#']) {
        cx.error(
            path,
            format!("{p:?}: a route path cannot hold a query or fragment"),
        );
    }
    let upper = p.to_ascii_uppercase();
    if upper.contains("%2F") || upper.contains("%5C") || p.contains('\\') {
        cx.error(path, format!("{p:?}: encoded slashes and backslashes never match (requests with them are refused unless gateway.encoded_slashes = \"keep\")"));
    }
    if p.contains(';') && parameters == PathParameters::Reject {
        cx.error(path, format!("{p:?}: a path parameter (';') never matches (requests with one are refused unless gateway.path_parameters = \"keep\")"));
    }
    match normalize(p, PathRules::KEEP) {
        Ok(n) if n == p => {}
        Ok(n) => cx.error(path, format!("{p:?} is not in normal form; write {n:?}")),
        Err(e) => cx.error(path, format!("{p:?}: {e}")),
    }
    if prefix {
        return PathMatch::Prefix(p.trim_end_matches('/').to_string());
    }
    if !is_template {
        return PathMatch::Exact(p.to_string());
    }
    let mut segs = Vec::new();
    let mut names = HashSet::new();
    for seg in p.split('/').skip(1) {
        if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if inner.is_empty()
                || !inner
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                cx.error(path, format!("{p:?}: template parameter {{{inner}}} must be a name of letters, digits and _"));
            } else if !names.insert(inner.to_string()) {
                cx.error(
                    path,
                    format!("{p:?}: template parameter {{{inner}}} is used twice"),
                );
            }
            segs.push(TemplateSegment::Param(inner.to_string()));
        } else if seg.contains(['{', '}']) {
            cx.error(
                path,
                format!(
                    "{p:?}: a template parameter must be a whole segment, such as /orders/{{id}}"
                ),
            );
        } else {
            segs.push(TemplateSegment::Literal(seg.to_string()));
        }
    }
    PathMatch::Template(segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = r#"
[gateway]
listen = "127.0.0.1:8080"
trusted_proxies = []

[admin]
listen = "127.0.0.1:9090"

[storage]
data_dir = "./apiwarden-data"

[audit]
durability = "strict"
checkpoint_interval = "1s"

[[upstreams]]
name = "orders"
url = "http://127.0.0.1:3000"

[[routes]]
name = "orders-read"
path_prefix = "/orders"
methods = ["GET"]
upstream = "orders"
auth = ["api_key"]
scopes = ["orders:read"]
limits = ["per-consumer"]

[limits.per-consumer]
rate = "100/s"
burst = 20
key = "consumer"

[[consumers]]
name = "billing"
scopes = ["orders:read"]
"#;

    #[test]
    fn the_spec_example_is_valid() {
        let c = parse(SPEC_EXAMPLE, "/etc/apiwarden/apiwarden.toml").unwrap();
        assert_eq!(c.routes[0].path, PathMatch::Prefix("/orders".into()));
        assert_eq!(c.routes[0].auth, vec![AuthMethod::ApiKey]);
        assert_eq!(c.upstreams[0].targets[0].authority, "127.0.0.1:3000");
        assert_eq!(c.limits["per-consumer"].burst, 20);
        assert_eq!(c.limits["per-consumer"].key, vec![LimitKey::Consumer]);
        assert_eq!(c.limits["per-consumer"].store, LimitStore::Local);
        assert_eq!(
            c.storage.data_dir,
            Path::new("/etc/apiwarden/./apiwarden-data")
        );
    }

    #[test]
    fn every_error_is_reported_at_once_with_its_position() {
        let text = r#"[gateway]
listen = "nowhere"
max_body_size = "10 parsecs"

[[upstreams]]
name = "a"
url = "ftp://x"

[[routes]]
name = "r"
path = "/a/../b"
upstream = "missing"

[[routes]]
name = "r2"
path_prefix = "/x"
upstream = "a"
auth = ["none"]
colour = "blue"
"#;
        let errs = parse(text, "gw.toml").unwrap_err().0;
        let got: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let expect_prefixes = [
            "gw.toml:2:10: \"nowhere\" is not a socket address",
            "gw.toml:3:17: invalid size unit",
            "gw.toml:7:7: \"ftp://x\" is not an upstream URL",
            "gw.toml:9:1: route \"r\" has no `auth`",
            "gw.toml:11:8: \"/a/../b\" is not in normal form",
            "gw.toml:12:12: route \"r\": upstream \"missing\" is not defined",
            "gw.toml:19:10: in [[routes]] #2: unknown field `colour`",
        ];
        assert_eq!(got.len(), expect_prefixes.len(), "{got:#?}");
        for (g, want) in got.iter().zip(expect_prefixes) {
            assert!(g.starts_with(want), "got {g:?}, want prefix {want:?}");
        }
    }

    /// Values that used to be accepted and then failed at run time (a panic, a route that
    /// never matches, a password on stderr).
    #[test]
    fn values_that_would_fail_later_are_refused_now() {
        let cases: &[(&str, &str)] = &[
            ("[gateway]\ntls = { cert = \"c\", key = \"k\", reload_interval = \"0s\" }\n", "must be longer than zero"),
            ("[gateway]\ntls = { cert = \"c\", key = \"k\", client_auth = \"required\" }\n", "client_auth needs client_ca"),
            ("[gateway]\ntls = { cert = \"c\", key = \"k\", client_ca = \"ca\", client_auth = \"request\" }\n", "\"optional\" or \"required\""),
            ("[gateway]\ntls = { cert = \"c\", key = \"k\", client_ca = \"\" }\n", "client_ca must name a PEM file"),
            ("[[consumers]]\nname = \"a\"\ncertificate_names = [\"Billing.internal\"]\n[[consumers]]\nname = \"b\"\ncertificate_names = [\"billing.internal\"]\n", "already given to consumer \"a\""),
            ("[[consumers]]\nname = \"a\"\ncertificate_names = [\"\"]\n", "non-empty SAN or CN"),
            ("[gateway]\nshutdown_timeout = \"300000000000y\"\n", "longer than ten years"),
            ("[gateway]\nidle_timeout = \"500ms\"\n", "at least 1s"),
            ("[gateway]\nworker_threads = 100000\n", "at most 1024"),
            ("[gateway]\nmax_connections = 0\n", "max_connections must be at least 1"),
            ("[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:1\"\nidle_timeout = \"200ms\"\n", "at least 1s"),
            ("[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:1\"\ntimeout = \"0s\"\n", "must be longer than zero"),
            ("[[upstreams]]\nname = \"u\"\nurl = \"http://admin:hunter2@127.0.0.1:1\"\n", "must not contain credentials"),
            ("[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:1/a b\"\n", "is not an upstream URL"),
            ("[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:1/a/../b\"\n", "is not an upstream URL"),
            (&format!("{U}[[routes]]\nname = \"r\"\npath = \"/a\"\nmethods = []\nupstream = \"u\"\nauth = [\"none\"]\n"), "`methods` is empty"),
            (&format!("{U}[[routes]]\nname = \"r\"\nhost = \"a.example.com:8080\"\npath = \"/a\"\nupstream = \"u\"\nauth = [\"none\"]\n"), "without port or path"),
            (&format!("{U}[[routes]]\nname = \"r\"\npath = \"/a%2Fb\"\nupstream = \"u\"\nauth = [\"none\"]\n"), "never match"),
            (&format!("{U}[[routes]]\nname = \"r\"\npath = \"/a?b=1\"\nupstream = \"u\"\nauth = [\"none\"]\n"), "query or fragment"),
            (&format!("{U}[[routes]]\nname = \"r\"\npath = \"/a;v=1\"\nupstream = \"u\"\nauth = [\"none\"]\n"), "gateway.path_parameters = \"keep\""),
            ("[gateway]\npath_parameters = \"strip\"\n", "\"reject\" or \"keep\""),
            ("[limits.l]\nrate = \"10/s\"\nburst = 0\n", "burst must be at least 1"),
            ("[limits.l]\nrate = \"10/w\"\n", "units s, m, h, d"),
            ("[limits.l]\nrate = \"10000000/s\"\n", "not a limit"),
            ("[limits.l]\nrate = \"10/s\"\nstore = \"redis\"\n", "needs storage.redis"),
            ("[jwt.j]\nissuer = \"http://idp.example.com\"\naudiences = [\"a\"]\n", "must be an https:// URL"),
            ("[jwt.j]\nissuer = \"https://idp.example.com\"\n", "needs `audiences`"),
            ("[admin.tokens.ops]\nrole = \"root\"\nsecret = \"env:T\"\n", "\"auditor\" (read only)"),
            (&format!("{U}[[routes]]\nname = \"r\"\npath = \"/a\"\nupstream = \"u\"\nauth = [\"none\"]\napi_key_query = \"k\"\n"), "needs \"api_key\""),
            (&format!("{U}[[routes]]\nname = \"r\"\npath = \"/a\"\nupstream = \"u\"\nauth = [\"api_key\"]\napi_key_query = \"a b\"\n"), "parameter name"),
            (&format!("[audit]\nhmac_query = [\"k\"]\n{U}[[routes]]\nname = \"r\"\npath = \"/a\"\nupstream = \"u\"\nauth = [\"api_key\"]\napi_key_query = \"k\"\n"), "route's `api_key_query`"),
            ("[audit]\nhmac_query = [\"access_token\"]\n", "names a credential"),
            ("[audit]\nsegment_size = \"5GiB\"\n", "at most 2GiB"),
            ("[admin.tokens.ops]\nrole = \"admin\"\nsecret = \"hunter2\"\n", "never goes in the config"),
            ("[jwt.j]\nissuer = \"https://idp.example.com\"\naudiences = [\"api\"]\nalgorithms = [\"HS256\"]\n", "HS256 needs a shared secret"),
            ("[jwt.j]\nissuer = \"https://idp.example.com\"\naudiences = [\"api\"]\nalgorithms = [\"none\"]\n", "not supported"),
            ("[jwt.j]\nissuer = \"https://idp.example.com\"\naudiences = [\"api\"]\nsecret = \"hunter2hunter2\"\n", "env:NAME"),
            ("[jwt.j]\nissuer = \"https://idp.example.com\"\naudiences = [\"api\"]\nsecret = \"env:S\"\nalgorithms = [\"RS256\"]\n", "accepts HS256 only"),
            ("[jwt.j]\nissuer = \"https://idp.example.com\"\naudiences = [\"api\"]\nleeway = \"1h\"\n", "at most 5m"),
            ("[[routes]]\nname = \"r\"\npath = \"/\"\nupstream = \"u\"\nauth = [\"jwt\"]\n", "define it in a [jwt.NAME] table"),
            ("[[routes]]\nname = \"r\"\npath = \"/\"\nupstream = \"u\"\nauth = [\"introspection\"]\n", "define it in a [introspection.NAME] table"),
            (&format!("{U}[[routes]]\nname = \"r\"\npath = \"/\"\nupstream = \"u\"\nauth = [\"api_key\"]\nintrospection = \"i\"\n"), "but `auth` does not list \"introspection\""),
            ("[introspection.i]\nurl = \"http://idp.example.com/introspect\"\nclient_id = \"gw\"\nclient_secret = \"env:S\"\n", "must be an https:// URL"),
            ("[introspection.i]\nurl = \"https://idp.example.com/introspect\"\nclient_id = \"gw\"\nclient_secret = \"hunter2hunter2\"\n", "never goes in the config"),
            ("[introspection.i]\nurl = \"https://idp.example.com/introspect\"\nclient_id = \"\"\nclient_secret = \"env:S\"\n", "client_id must be"),
            ("[introspection.i]\nurl = \"https://idp.example.com/introspect\"\nclient_id = \"gw\"\n", "missing field `client_secret`"),
            ("[introspection.i]\nurl = \"https://idp.example.com/introspect\"\nclient_id = \"gw\"\nclient_secret = \"env:S\"\ncache_ttl = \"2h\"\n", "at most 1h"),
            ("[introspection.i]\nurl = \"https://idp.example.com/introspect\"\nclient_id = \"gw\"\nclient_secret = \"env:S\"\nnegative_cache_ttl = \"0s\"\n", "longer than zero"),
            ("[introspection.i]\nurl = \"https://idp.example.com/introspect\"\nclient_id = \"gw\"\nclient_secret = \"env:S\"\ntimeout = \"0s\"\n", "longer than zero"),
            ("[limits.l]\nrate = \"10/s\"\nkey = [\"ip\", \"ip\"]\n", "listed twice"),
            ("[limits.l]\nrate = \"10/s\"\nkey = \"header:a b\"\n", "header name"),
            ("[limits.l]\nrate = \"10/s\"\nkey = []\n", "at least one"),
            ("[limits.l]\nrate = \"10/s\"\nfailure_mode = \"maybe\"\n", "\"open\" or \"closed\""),
            ("[storage]\nredis = \"http://127.0.0.1\"\n", "redis://"),
            ("[storage]\nredis = \"http://admin:hunter2@127.0.0.1\"\n", "***@127.0.0.1"),
            ("[storage]\nlimit_keys = 1000000000000\n", "at most"),
            ("[storage]\npepper = \"hunter2\"\n", "never goes in the config"),
            ("[[consumers]]\nname = \"c\"\nscopes = [\"orders read\"]\n", "without spaces"),
            (&format!("{U}[[routes]]\nname = \"r\"\npath = \"/a\"\nupstream = \"u\"\nauth = [\"none\"]\nroles = [\"x\"]\n"), "roles need an authenticated caller"),
            ("[limits.l]\nrate = \"1/d\"\nburst = 100000\n", "ten years"),
            ("[audit]\nsegment_size = \"100B\"\n", "at least 1KiB"),
            ("[audit]\nsegment_size = \"lots\"\n", "invalid size"),
            ("[audit]\nsegment_max_age = \"0s\"\n", "longer than zero"),
            ("[audit]\nretention = \"forever\"\n", "invalid duration"),
            ("[audit]\nretention = \"0s\"\n", "longer than zero"),
            ("[audit]\nretention_requires_export = [\"../x\"]\n", "not an export cursor name"),
            ("[audit]\nretention_requires_export = [\"siem\", \"siem\"]\n", "listed twice"),
        ];
        for (text, want) in cases {
            let errs = parse(text, "v.toml").expect_err(text).to_string();
            assert!(errs.contains(want), "{text}\n=> {errs}");
            assert!(
                !errs.contains("hunter2"),
                "a password in a URL is never echoed: {errs}"
            );
        }
    }

    const U: &str = "[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:1\"\n";

    /// Robustness: a valid file with random bytes changed, removed or duplicated is either
    /// accepted or refused with positioned errors, never a panic.
    #[test]
    fn mutated_files_never_panic() {
        let base = SPEC_EXAMPLE.as_bytes();
        let alphabet = b"[]{}=\"',.#\n /:-_0123456789abcxyz\\";
        let mut rng = crate::XorShift(0x1234_5678_9ABC_DEF1);
        for _ in 0..3000 {
            let mut bytes = base.to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(bytes.len());
                match rng.below(3) {
                    0 => bytes[at] = alphabet[rng.below(alphabet.len())],
                    1 => {
                        bytes.remove(at);
                    }
                    _ => {
                        let end = (at + rng.below(40)).min(bytes.len());
                        let chunk = bytes[at..end].to_vec();
                        bytes.splice(at..at, chunk);
                    }
                }
            }
            let Ok(text) = String::from_utf8(bytes) else {
                continue;
            };
            if let Err(errs) = parse(&text, "m.toml") {
                for e in &errs.0 {
                    assert!(e.line >= 1 && e.column >= 1 && !e.message.is_empty(), "{e}");
                }
            }
        }
    }

    #[test]
    fn limits_take_compound_keys_and_default_to_redis_in_fleet_mode() {
        let text = "[storage]\nredis = \"redis://127.0.0.1/\"\n[limits.a]\nrate = \"5/m\"\nkey = [\"consumer\", \"header:X-Tenant\"]\n[limits.b]\nrate = \"100000/d\"\nstore = \"local\"\nfailure_mode = \"closed\"\n";
        let c = parse(text, "l.toml").unwrap();
        let a = &c.limits["a"];
        assert_eq!(
            a.key,
            vec![LimitKey::Consumer, LimitKey::Header("x-tenant".into())]
        );
        assert_eq!(
            (a.requests, a.per, a.burst),
            (5, Duration::from_secs(60), 5)
        );
        assert_eq!(
            (a.store, a.failure_mode),
            (LimitStore::Redis, FailureMode::Open)
        );
        let b = &c.limits["b"];
        assert_eq!(
            (b.store, b.failure_mode, b.burst),
            (LimitStore::Local, FailureMode::Closed, 100_000)
        );
        assert_eq!(c.storage.redis_prefix, "apiwarden");
        assert_eq!(c.storage.redis_timeout, Duration::from_millis(100));
    }

    #[test]
    fn audit_segments_and_retention() {
        let c = parse("", "r.toml").unwrap();
        assert_eq!(c.audit.segment_size, 64 << 20);
        assert_eq!(c.audit.segment_max_age, Duration::from_secs(86_400));
        assert_eq!(c.audit.retention, None);
        assert!(c.audit.retention_requires_export.is_empty());
        let text = "[audit]\nsegment_size = \"4KiB\"\nsegment_max_age = \"1h\"\nretention = \"90d\"\nretention_requires_export = [\"siem\", \"archive-1\"]\n";
        let c = parse(text, "r.toml").unwrap();
        assert_eq!(c.audit.segment_size, 4096);
        assert_eq!(c.audit.segment_max_age, Duration::from_secs(3600));
        assert_eq!(c.audit.retention, Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(c.audit.retention_requires_export, ["siem", "archive-1"]);
        // Errors name the line and column of the value.
        let errs = parse(
            "[audit]\nsegment_max_age = \"1d\"\nretention = \"soon\"\n",
            "r.toml",
        )
        .unwrap_err()
        .0;
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].line, errs[0].column), (3, 13), "{}", errs[0]);
        let errs = parse(
            "[audit]\nretention_requires_export = [\"ok\", \"a/b\"]\n",
            "r.toml",
        )
        .unwrap_err()
        .0;
        assert_eq!((errs[0].line, errs[0].column), (2, 36), "{}", errs[0]);
    }

    #[test]
    fn a_syntax_error_names_its_position() {
        let errs = parse("[gateway]\nlisten = \n", "x.toml").unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].line, errs[0].file.as_str()), (2, "x.toml"));
        assert!(
            errs[0].message.starts_with("invalid TOML"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn templates_and_hosts() {
        let text = r#"
[[upstreams]]
name = "u"
url = "http://localhost:3000/base/"
[[routes]]
name = "t"
host = "*.Example.com"
path = "/orders/{id}/items/{item}"
upstream = "u"
auth = ["none"]
"#;
        let c = parse(text, "t.toml").unwrap();
        assert_eq!(
            c.routes[0].host,
            Some(HostMatch::Suffix(".example.com".into()))
        );
        assert_eq!(
            c.upstreams[0].targets[0],
            Target {
                authority: "localhost:3000".into(),
                base_path: "/base".into()
            }
        );
        assert_eq!(
            c.routes[0].path,
            PathMatch::Template(vec![
                TemplateSegment::Literal("orders".into()),
                TemplateSegment::Param("id".into()),
                TemplateSegment::Literal("items".into()),
                TemplateSegment::Param("item".into()),
            ])
        );
    }

    #[test]
    fn client_certificates_are_configured() {
        let text = "[gateway]\ntls = { cert = \"s.pem\", key = \"s.key\", client_ca = \"ca/clients.pem\" }\n\
                    [[consumers]]\nname = \"billing\"\ncertificate_names = [\"billing.internal\", \"spiffe://example.org/billing\"]\n";
        let c = parse(text, "/etc/aw/gw.toml").unwrap();
        let tls = c.gateway.tls.unwrap();
        assert_eq!(
            tls.client_ca.as_deref(),
            Some(Path::new("/etc/aw/ca/clients.pem"))
        );
        assert_eq!(tls.client_auth, ClientAuth::Optional);
        assert_eq!(
            c.consumers[0].certificate_names,
            ["billing.internal", "spiffe://example.org/billing"]
        );
        let required = text.replace("clients.pem\"", "clients.pem\", client_auth = \"required\"");
        let c = parse(&required, "/etc/aw/gw.toml").unwrap();
        assert_eq!(c.gateway.tls.unwrap().client_auth, ClientAuth::Required);
    }

    #[test]
    fn every_documented_option_is_accepted() {
        // Build one file that sets every option of REFERENCE to its example value.
        let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for o in REFERENCE {
            let (section, key) = o.key.rsplit_once('.').unwrap();
            let header = match section {
                "upstreams[]" => "[[upstreams]]".to_string(),
                "routes[]" => "[[routes]]".to_string(),
                "consumers[]" => "[[consumers]]".to_string(),
                "limits.NAME" => "[limits.l]".to_string(),
                "jwt.NAME" => "[jwt.corp]".to_string(),
                "introspection.NAME" => "[introspection.corp]".to_string(),
                "admin.tokens.NAME" => "[admin.tokens.ops]".to_string(),
                s => format!("[{s}]"),
            };
            // `url` and `targets` exclude each other, and so do `path` and `path_prefix`.
            // And a JWKS and a shared secret.
            if key == "targets" || key == "path_prefix" || (section, key) == ("jwt.NAME", "secret")
            {
                continue;
            }
            sections
                .entry(header)
                .or_default()
                .push(format!("{key} = {}", o.example));
        }
        let text: String = sections
            .iter()
            .map(|(h, lines)| format!("{h}\n{}\n", lines.join("\n")))
            .collect();
        let parsed = parse(&text, "all.toml");
        assert!(parsed.is_ok(), "{text}\n{}", parsed.unwrap_err());
    }
}
