//! Stage one: the configuration file as written, as plain serde types.
//!
//! Leaves are kept as strings and numbers; stage two (`validate.rs`) parses them into their
//! meaning, so that each of its errors can name the exact key it is about. Every option is
//! documented in [`super::REFERENCE`], which the README's configuration reference is generated
//! from.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Gateway {
    pub listen: Option<String>,
    pub tls: Option<Tls>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub max_body_size: Option<Size>,
    pub max_header_size: Option<Size>,
    pub encoded_slashes: Option<String>,
    pub path_parameters: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub node: Option<String>,
    pub worker_threads: Option<u64>,
    pub max_connections: Option<u64>,
    pub h2c: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Tls {
    pub cert: String,
    pub key: String,
    pub client_ca: Option<String>,
    pub client_auth: Option<String>,
    pub reload_interval: Option<String>,
}

/// A size as an integer or a string with a unit.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Size {
    Int(u64),
    Str(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Admin {
    pub listen: Option<String>,
    pub tokens: Option<std::collections::BTreeMap<String, AdminToken>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminToken {
    pub role: String,
    pub secret: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Storage {
    pub data_dir: Option<String>,
    pub database: Option<String>,
    pub redis: Option<String>,
    pub redis_prefix: Option<String>,
    pub redis_timeout: Option<String>,
    pub limit_keys: Option<u64>,
    pub pepper: Option<String>,
    pub key_max_age: Option<String>,
    pub key_unused_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Audit {
    pub durability: Option<String>,
    pub strict_timeout: Option<String>,
    pub checkpoint_interval: Option<String>,
    pub checkpoint_copy: Option<String>,
    #[serde(default)]
    pub hmac_headers: Vec<String>,
    #[serde(default)]
    pub hmac_query: Vec<String>,
    pub encryption_key: Option<String>,
    pub segment_size: Option<Size>,
    pub segment_max_age: Option<String>,
    pub retention: Option<String>,
    #[serde(default)]
    pub retention_requires_export: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Upstream {
    pub name: String,
    pub url: Option<String>,
    pub targets: Option<Vec<String>>,
    pub connect_timeout: Option<String>,
    pub timeout: Option<String>,
    pub failure_threshold: Option<u32>,
    pub cooldown: Option<String>,
    pub max_idle: Option<u64>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Route {
    pub name: String,
    pub host: Option<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub methods: Option<Vec<String>>,
    pub upstream: String,
    pub auth: Option<Vec<String>>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub limits: Vec<String>,
    pub jwt: Option<String>,
    pub introspection: Option<String>,
    pub api_key_query: Option<String>,
    pub audit_failure: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Jwt {
    pub issuer: String,
    pub jwks_url: Option<String>,
    pub secret: Option<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub algorithms: Option<Vec<String>>,
    pub leeway: Option<String>,
    pub refresh: Option<String>,
    pub min_refresh: Option<String>,
    pub timeout: Option<String>,
    pub ca: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Introspection {
    pub url: String,
    pub client_id: String,
    pub client_secret: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub issuer: Option<String>,
    pub cache_ttl: Option<String>,
    pub negative_cache_ttl: Option<String>,
    pub timeout: Option<String>,
    pub ca: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Limit {
    pub rate: String,
    pub burst: Option<u64>,
    pub key: Option<OneOrMany>,
    pub store: Option<String>,
    pub failure_mode: Option<String>,
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Consumer {
    pub name: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub allow_ips: Option<Vec<String>>,
    #[serde(default)]
    pub certificate_names: Vec<String>,
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub token_issuers: Vec<String>,
}
