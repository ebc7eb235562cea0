//! Audit events in the formats SIEMs ingest directly: OCSF API Activity (class 6003), Elastic
//! Common Schema, ArcSight CEF and QRadar LEEF 2.0. `apiwarden audit export --format ...` writes
//! one line per ledger record with these functions.
//!
//! Each function maps one event, the ledger's record as JSON (the SPEC's schema version 1, see
//! [`crate::event`]), to one line, without I/O. Values are taken from the record as they are:
//! the query string stays redacted and `hmac:` values stay HMACs (the ledger holds no secret, so
//! no export can). A field the record does not have (null, empty) is left out, never written as
//! `null`. What OCSF and ECS have no field for goes, as it is in the record, to OCSF's
//! `unmapped` and to ECS's `apiwarden` object, so nothing is lost.

use serde_json::{json, Map, Value};
use std::cell::RefCell;

/// The OCSF schema version the `ocsf` lines follow.
pub const OCSF_VERSION: &str = "1.3.0";
/// The ECS version the `ecs` lines follow.
pub const ECS_VERSION: &str = "8.11.0";
/// Vendor and product name in every format.
pub const PRODUCT: &str = "apiwarden";
/// The product version written in headers and metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// OCSF class `API Activity`.
pub const OCSF_CLASS_UID: u32 = 6003;
/// OCSF category `Application Activity`.
pub const OCSF_CATEGORY_UID: u32 = 6;

/// The output formats of `audit export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The ledger's own records, one JSON document a line (NDJSON).
    Json,
    /// OCSF 1.x API Activity (class 6003), one JSON document a line.
    Ocsf,
    /// Elastic Common Schema, one JSON document a line.
    Ecs,
    /// ArcSight Common Event Format, one line an event.
    Cef,
    /// IBM QRadar Log Event Extended Format 2.0, tab-delimited, one line an event.
    Leef,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::Json,
        Format::Ocsf,
        Format::Ecs,
        Format::Cef,
        Format::Leef,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Ocsf => "ocsf",
            Format::Ecs => "ecs",
            Format::Cef => "cef",
            Format::Leef => "leef",
        }
    }

    pub fn parse(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.as_str() == name)
    }
}

/// One line (without its newline) of `event` in `format`.
pub fn to_line(format: Format, event: &Value) -> String {
    match format {
        Format::Json => event.to_string(),
        Format::Ocsf => ocsf(event).to_string(),
        Format::Ecs => ecs(event).to_string(),
        Format::Cef => cef(event),
        Format::Leef => leef(event),
    }
}

/// How much an event matters to a security team, shared by every format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Allowed, nothing went wrong.
    Informational,
    /// Refused or failed for a reason that is not an attack on its own: no route, a
    /// malformed request, an upstream failure, a client gone.
    Low,
    /// Refused by authentication, authorisation or a limit.
    Medium,
    /// A sign of an attack or of a broken audit trail: a blocked client, a revoked key, a
    /// forged or unsigned token, a cut ledger record, a ledger that cannot record.
    High,
}

impl Severity {
    /// OCSF `severity_id` and `severity`.
    pub fn ocsf(self) -> (u8, &'static str) {
        match self {
            Severity::Informational => (1, "Informational"),
            Severity::Low => (2, "Low"),
            Severity::Medium => (3, "Medium"),
            Severity::High => (4, "High"),
        }
    }

    /// On the 0 to 10 scale of CEF and LEEF (also ECS's `event.severity`).
    pub fn score(self) -> u8 {
        match self {
            Severity::Informational => 1,
            Severity::Low => 3,
            Severity::Medium => 5,
            Severity::High => 8,
        }
    }
}

/// The severity of an event, from its decision, reason code and error.
pub fn severity(event: &Value) -> Severity {
    let reason = text(event, "decision.reason").unwrap_or("");
    let denied = text(event, "decision.outcome") == Some("deny");
    match reason {
        "ledger.record_cut" | "audit.unavailable" => Severity::High,
        "blocked"
        | "authn.revoked_key"
        | "authn.alg_none"
        | "authn.alg_confusion"
        | "authn.bad_signature"
            if denied =>
        {
            Severity::High
        }
        r if denied
            && (r.starts_with("authn.")
                || r.starts_with("authz.")
                || r.starts_with("ratelimit.")) =>
        {
            Severity::Medium
        }
        _ if denied || text(event, "error").is_some() => Severity::Low,
        _ => Severity::Informational,
    }
}

/// OCSF API Activity's `activity_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    Create = 1,
    Read = 2,
    Update = 3,
    Delete = 4,
    Other = 99,
}

impl Activity {
    pub fn id(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            Activity::Create => "Create",
            Activity::Read => "Read",
            Activity::Update => "Update",
            Activity::Delete => "Delete",
            Activity::Other => "Other",
        }
    }

    fn of_method(method: &str) -> Activity {
        match method.to_ascii_uppercase().as_str() {
            "POST" => Activity::Create,
            "GET" | "HEAD" => Activity::Read,
            "PUT" | "PATCH" => Activity::Update,
            "DELETE" => Activity::Delete,
            _ => Activity::Other,
        }
    }
}

/// The verb of an admin event's message (`key K of consumer C revoked by ...`, `block list:
/// added ip ...`) and what it does: the first of the words the ledger's admin events use.
fn admin_verb(message: &str) -> Option<(&str, Activity)> {
    message
        .split(|c: char| !c.is_ascii_alphanumeric())
        .find_map(|w| {
            let a = match w {
                "created" | "added" | "issued" => Activity::Create,
                "rotated" | "updated" | "changed" => Activity::Update,
                "revoked" | "removed" | "deleted" | "expired" => Activity::Delete,
                "listed" | "read" => Activity::Read,
                _ => return None,
            };
            Some((w, a))
        })
}

/// What an event did: a request by its HTTP method; an admin change by the verb of its
/// message (or, for an admin API call, its method); anything else is `Other`.
pub fn activity(event: &Value) -> Activity {
    let method = text(event, "request.method");
    if text(event, "kind") == Some("admin") {
        if let Some((_, a)) = text(event, "message").and_then(admin_verb) {
            return a;
        }
    }
    method.map_or(Activity::Other, Activity::of_method)
}

/// OCSF `type_uid`: `class_uid * 100 + activity_id`.
pub fn ocsf_type_uid(activity: Activity) -> u32 {
    OCSF_CLASS_UID * 100 + activity.id()
}

/// The field at a dotted path, or `None` when it is missing, null or empty.
fn field<'a>(event: &'a Value, path: &str) -> Option<&'a Value> {
    let mut v = event;
    for k in path.split('.') {
        v = v.get(k)?;
    }
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::Array(a) if a.is_empty() => None,
        Value::Object(o) if o.is_empty() => None,
        _ => Some(v),
    }
}

fn text<'a>(event: &'a Value, path: &str) -> Option<&'a str> {
    field(event, path).and_then(Value::as_str)
}

/// Epoch milliseconds of an RFC 3339 time.
fn epoch_ms(time: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(time).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

/// The record, and which of its fields a mapping used: what is left over is the mapping's
/// `unmapped` part.
struct Record<'a> {
    event: &'a Value,
    used: RefCell<Vec<&'static str>>,
}

impl<'a> Record<'a> {
    fn new(event: &'a Value) -> Self {
        Record {
            event,
            used: RefCell::new(Vec::new()),
        }
    }

    /// A field that goes into the output (so not into what is left over).
    fn get(&self, path: &'static str) -> Option<&'a Value> {
        let v = field(self.event, path);
        if v.is_some() {
            self.used.borrow_mut().push(path);
        }
        v
    }

    fn str(&self, path: &'static str) -> Option<&'a str> {
        match self.get(path) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    fn u64(&self, path: &'static str) -> Option<u64> {
        self.get(path).and_then(Value::as_u64)
    }

    /// A field read to decide something, which stays in what is left over.
    fn peek(&self, path: &str) -> Option<&'a str> {
        text(self.event, path)
    }

    /// The record without the fields used, nulls and empty objects: `None` when nothing is
    /// left.
    fn rest(&self) -> Option<Value> {
        let mut v = self.event.clone();
        for path in self.used.borrow().iter() {
            let (parent, last) = match path.rsplit_once('.') {
                Some((parent, last)) => (format!("/{}", parent.replace('.', "/")), last),
                None => (String::new(), *path),
            };
            if let Some(o) = v.pointer_mut(&parent).and_then(Value::as_object_mut) {
                o.remove(last);
            }
        }
        prune(v)
    }
}

/// Drops nulls, empty strings and empty arrays and objects, recursively.
fn prune(v: Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::Array(a) => {
            let a: Vec<Value> = a.into_iter().filter_map(prune).collect();
            (!a.is_empty()).then_some(Value::Array(a))
        }
        Value::Object(o) => {
            let o: Map<String, Value> = o
                .into_iter()
                .filter_map(|(k, v)| prune(v).map(|v| (k, v)))
                .collect();
            (!o.is_empty()).then_some(Value::Object(o))
        }
        v => Some(v),
    }
}

/// Builds a JSON object leaving out absent values and empty objects.
#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn new() -> Self {
        Obj::default()
    }

    fn set(&mut self, key: &str, v: impl Into<Value>) -> &mut Self {
        if let Some(v) = prune(v.into()) {
            self.0.insert(key.to_string(), v);
        }
        self
    }

    fn opt<T: Into<Value>>(&mut self, key: &str, v: Option<T>) -> &mut Self {
        if let Some(v) = v {
            self.set(key, v);
        }
        self
    }

    fn obj(&mut self, key: &str, o: Obj) -> &mut Self {
        self.set(key, Value::Object(o.0))
    }

    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

/// `allow` → success, `deny` → failure.
fn succeeded(outcome: Option<&str>) -> Option<bool> {
    match outcome {
        Some("allow") => Some(true),
        Some("deny") => Some(false),
        _ => None,
    }
}

/// The response status, when a response was sent (0 is none).
fn status(r: &Record<'_>) -> Option<u64> {
    r.u64("response.status").filter(|&s| s != 0)
}

/// Whether the event describes an HTTP exchange (a request, or an admin API call).
fn is_http(r: &Record<'_>) -> bool {
    r.peek("kind") == Some("request") || r.peek("request.method").is_some()
}

/// `path?query`, as the record has them (the query redacted).
fn path_and_query(r: &Record<'_>) -> Option<String> {
    let path = r.str("request.path")?;
    Some(match r.str("request.query") {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    })
}

/// `X-Forwarded-For` as a list of its entries.
fn forwarded_list(v: &str) -> Vec<Value> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| Value::String(s.to_string()))
        .collect()
}

/// `hmac_headers` as `[{"name","value"}]`.
fn header_list(v: Option<&Value>) -> Vec<Value> {
    v.and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .map(|(k, v)| json!({ "name": k, "value": v }))
                .collect()
        })
        .unwrap_or_default()
}

/// The event as an OCSF API Activity (class 6003) object.
pub fn ocsf(event: &Value) -> Value {
    let r = Record::new(event);
    let kind = r.peek("kind").unwrap_or("request");
    let act = activity(event);
    let (severity_id, severity_name) = severity(event).ocsf();
    let mut o = Obj::new();
    o.set("class_uid", OCSF_CLASS_UID)
        .set("class_name", "API Activity")
        .set("category_uid", OCSF_CATEGORY_UID)
        .set("category_name", "Application Activity")
        .set("activity_id", act.id())
        .set("activity_name", act.name())
        .set("type_uid", ocsf_type_uid(act))
        .set("type_name", format!("API Activity: {}", act.name()))
        .set("severity_id", severity_id)
        .set("severity", severity_name);
    let time = r.str("time");
    o.opt("time", time.and_then(epoch_ms));
    match succeeded(r.str("decision.outcome")) {
        Some(true) => o.set("status", "Success").set("status_id", 1),
        Some(false) => o.set("status", "Failure").set("status_id", 2),
        None => &mut o,
    };
    let http = is_http(&r);
    let code = status(&r);
    o.opt("status_code", code.map(|c| c.to_string()))
        .opt("status_detail", r.str("decision.reason"))
        .opt("message", r.str("message"));
    if kind == "request" {
        o.opt("duration", r.u64("response.latency_us").map(|us| us / 1000));
    }

    let request_id = r.str("request_id");
    let mut product = Obj::new();
    product
        .set("name", PRODUCT)
        .set("vendor_name", PRODUCT)
        .set("version", VERSION);
    let mut meta = Obj::new();
    meta.set("version", OCSF_VERSION)
        .obj("product", product)
        .opt("uid", r.str("event_id"))
        .opt("correlation_uid", request_id)
        .opt("sequence", r.u64("seq"))
        .opt("original_time", time)
        .set("log_name", "audit");
    o.obj("metadata", meta);

    // Who: the consumer and its credential for a request, the actor of an admin change (the
    // consumer and key it changed are resources), apiwarden itself for a system event.
    let mut actor = Obj::new();
    let mut user = Obj::new();
    let mut resources = Vec::new();
    match kind {
        "admin" => {
            user.opt("name", r.str("actor").or_else(|| r.str("identity.subject")));
            if let Some(k) = r.str("identity.key_id") {
                resources.push(json!({ "type": "api_key", "uid": k }));
            }
            if let Some(c) = r.str("identity.consumer") {
                resources.push(json!({ "type": "consumer", "name": c }));
            }
        }
        "system" => {
            actor.set("app_name", PRODUCT);
        }
        _ => {
            let key = r.str("identity.key_id");
            user.opt("name", r.str("identity.consumer"))
                .opt("uid", key.or_else(|| r.str("identity.subject")))
                .opt("credential_uid", key);
        }
    }
    actor.obj("user", user);
    if kind != "system" {
        let mut auth = Obj::new();
        auth.opt("decision", r.peek("decision.outcome")).opt(
            "policy",
            r.str("decision.policy").map(|p| json!({ "name": p })),
        );
        if let Some(a) = prune(auth.done()) {
            actor.set("authorizations", vec![a]);
        }
    }
    o.obj("actor", actor);

    let mut src = Obj::new();
    src.opt("ip", r.str("client.ip"));
    o.obj("src_endpoint", src);

    let method = r.str("request.method");
    let path = r.peek("request.path");
    if http {
        let mut url = Obj::new();
        url.opt("hostname", r.str("request.host"))
            .opt("path", r.str("request.path"))
            .opt("query_string", r.str("request.query"));
        let mut req = Obj::new();
        req.opt("http_method", method)
            .obj("url", url)
            .opt("user_agent", r.str("request.user_agent"))
            .opt("length", r.u64("request.bytes"))
            .opt("uid", request_id)
            .opt(
                "x_forwarded_for",
                r.str("client.forwarded_for").map(forwarded_list),
            )
            .set("http_headers", header_list(r.get("request.headers_hmac")));
        o.obj("http_request", req);
        let mut resp = Obj::new();
        resp.opt("code", code)
            .opt("length", r.u64("response.bytes"));
        o.obj("http_response", resp);
    }

    // The API operation: the route as configured (`GET /orders/{id}`), the path when no route
    // matched, the change for an admin event without a call.
    let route_template = r.peek("request.route");
    let operation = match (kind, method) {
        ("admin", None) => {
            let verb = r.peek("message").and_then(admin_verb).map(|(w, _)| w);
            let policy = r.peek("decision.policy");
            match (policy, verb) {
                (Some(p), Some(v)) => format!("{p}.{v}"),
                (Some(p), None) => p.to_string(),
                (None, Some(v)) => v.to_string(),
                (None, None) => "admin".to_string(),
            }
        }
        (_, Some(m)) => match route_template.or(path) {
            Some(p) => format!("{m} {p}"),
            None => m.to_string(),
        },
        ("system", None) => "system".to_string(),
        _ => "request".to_string(),
    };
    if route_template.is_some() && method.is_some() {
        r.get("request.route");
    }
    let mut service = Obj::new();
    service.opt(
        "name",
        r.str("upstream.name")
            .or_else(|| r.str("request.route_name"))
            .or_else(|| {
                (kind == "admin")
                    .then(|| r.peek("decision.policy"))
                    .flatten()
            }),
    );
    let mut api = Obj::new();
    api.set("operation", operation)
        .obj("service", service)
        .opt("request", request_id.map(|id| json!({ "uid": id })));
    o.obj("api", api);
    o.set("resources", resources);
    o.opt("unmapped", r.rest());
    o.done()
}

/// The event as an Elastic Common Schema document.
pub fn ecs(event: &Value) -> Value {
    let r = Record::new(event);
    let kind = r.peek("kind").unwrap_or("request");
    let act = activity(event);
    let outcome = succeeded(r.str("decision.outcome"));
    let error = r.str("error");

    let (category, mut types, action): (&str, Vec<&str>, String) = match kind {
        "admin" => {
            let t = match act {
                Activity::Create => "creation",
                Activity::Update => "change",
                Activity::Delete => "deletion",
                Activity::Read | Activity::Other => "info",
            };
            let verb = r.peek("message").and_then(admin_verb).map(|(w, _)| w);
            let action = match (r.peek("decision.policy"), verb) {
                (Some(p), Some(v)) => format!("{p}-{v}"),
                (Some(p), None) => p.to_string(),
                (None, Some(v)) => v.to_string(),
                (None, None) => "admin".to_string(),
            };
            ("iam", vec!["admin", t], action)
        }
        "system" => ("process", vec!["info"], "system".to_string()),
        _ => (
            "web",
            vec!["access"],
            r.peek("decision.outcome").unwrap_or("request").to_string(),
        ),
    };
    if error.is_some() && !types.contains(&"error") && category == "web" {
        types.push("error");
    }

    let mut ev = Obj::new();
    ev.set("kind", "event")
        .set("category", vec![category])
        .set("type", types)
        .set("action", action)
        .opt(
            "outcome",
            outcome.map(|ok| if ok { "success" } else { "failure" }),
        )
        .opt("reason", r.str("decision.reason"))
        .opt("id", r.str("event_id"))
        .opt("sequence", r.u64("seq"))
        .set("severity", severity(event).score())
        .set("dataset", "apiwarden.audit")
        .set("module", "apiwarden");
    if kind == "request" {
        ev.opt(
            "duration",
            r.u64("response.latency_us")
                .map(|us| us.saturating_mul(1000)),
        );
    }

    let mut o = Obj::new();
    o.opt("@timestamp", r.str("time"))
        .set("ecs", json!({ "version": ECS_VERSION }))
        .obj("event", ev)
        .opt("message", r.str("message"));

    if is_http(&r) {
        let mut req = Obj::new();
        req.opt("id", r.str("request_id"))
            .opt("method", r.str("request.method"))
            .opt("bytes", r.u64("request.bytes"));
        let mut resp = Obj::new();
        resp.opt("status_code", status(&r))
            .opt("bytes", r.u64("response.bytes"));
        let mut http = Obj::new();
        http.obj("request", req).obj("response", resp);
        o.obj("http", http);
        let mut url = Obj::new();
        url.opt("domain", r.str("request.host"))
            .opt("path", r.str("request.path"))
            .opt("query", r.str("request.query"));
        o.obj("url", url);
        o.opt(
            "user_agent",
            r.str("request.user_agent")
                .map(|ua| json!({ "original": ua })),
        );
    } else {
        o.opt("trace", r.str("request_id").map(|id| json!({ "id": id })));
    }

    let ip = r.str("client.ip");
    o.opt("client", ip.map(|ip| json!({ "ip": ip })))
        .opt("source", ip.map(|ip| json!({ "ip": ip })));

    let consumer = r.str("identity.consumer");
    let mut user = Obj::new();
    let mut related_users = Vec::new();
    if kind == "admin" {
        let actor = r.str("actor");
        user.opt("name", actor)
            .opt("target", consumer.map(|c| json!({ "name": c })));
        related_users.extend(actor);
    } else {
        user.opt("name", consumer);
    }
    related_users.extend(consumer);
    o.obj("user", user);
    let mut related = Obj::new();
    related
        .opt("ip", ip.map(|ip| vec![ip]))
        .set("user", related_users);
    o.obj("related", related);

    let mut observer = Obj::new();
    observer
        .opt("name", r.str("node"))
        .set("product", PRODUCT)
        .set("vendor", PRODUCT)
        .set("version", VERSION)
        .set("type", "api-gateway");
    o.obj("observer", observer);

    let mut tls = Obj::new();
    if let Some(v) = r.str("tls.version") {
        match v.strip_prefix("TLSv") {
            Some(n) => tls.set("version", n).set("version_protocol", "tls"),
            None => tls.set("version", v),
        };
    }
    tls.opt(
        "client",
        r.str("tls.client_subject").map(|s| json!({ "subject": s })),
    );
    o.obj("tls", tls);
    o.opt("error", error.map(|e| json!({ "code": e }))).opt(
        "rule",
        r.str("decision.policy").map(|p| json!({ "name": p })),
    );
    o.opt("apiwarden", r.rest());
    o.done()
}

/// Escapes a CEF header field: `\` and `|` (newlines cannot be in a header: a space).
fn cef_header(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            '\r' | '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a CEF extension value: `\`, `=`, and newlines as `\n` / `\r`.
fn cef_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// Key-value pairs of a CEF or LEEF line, absent values left out.
#[derive(Default)]
struct Pairs(Vec<(&'static str, String)>);

impl Pairs {
    fn add(&mut self, key: &'static str, v: Option<impl ToString>) {
        if let Some(v) = v {
            let v = v.to_string();
            if !v.is_empty() {
                self.0.push((key, v));
            }
        }
    }

    /// A custom field with its label (`cs1` and `cs1Label`), only when the value is there.
    fn labelled(
        &mut self,
        key: &'static str,
        label_key: &'static str,
        label: &str,
        v: Option<impl ToString>,
    ) {
        let before = self.0.len();
        self.add(key, v);
        if self.0.len() > before {
            self.0.push((label_key, label.to_string()));
        }
    }
}

/// A short name of the event for CEF's `Name` header.
fn event_name(kind: &str, outcome: Option<bool>) -> &'static str {
    match (kind, outcome) {
        ("admin", Some(false)) => "admin action refused",
        ("admin", _) => "admin action",
        ("system", _) => "system event",
        (_, Some(false)) => "request denied",
        _ => "request allowed",
    }
}

/// The user of an event: the consumer of a request, the actor of an admin change.
fn user_of<'a>(r: &Record<'a>, kind: &str) -> Option<&'a str> {
    if kind == "admin" {
        r.str("actor")
    } else {
        r.str("identity.consumer")
    }
}

/// The event as an ArcSight CEF line: `CEF:0|apiwarden|apiwarden|VERSION|REASON|NAME|SEVERITY|`
/// and the extension (standard keys; `cs1`..`cs6`, `cn1`..`cn3` and `flexString1`/`2` with
/// their labels).
pub fn cef(event: &Value) -> String {
    let r = Record::new(event);
    let kind = r.peek("kind").unwrap_or("request");
    let outcome = succeeded(r.peek("decision.outcome"));
    let reason = r.peek("decision.reason").unwrap_or("unknown");
    let mut p = Pairs::default();
    p.add("rt", r.str("time").and_then(epoch_ms));
    p.add("cat", Some(kind));
    p.add("act", r.str("decision.outcome"));
    p.add(
        "outcome",
        outcome.map(|ok| if ok { "success" } else { "failure" }),
    );
    p.add("reason", r.str("decision.reason"));
    p.add("src", r.str("client.ip"));
    p.add("suser", user_of(&r, kind));
    if kind == "admin" {
        p.add("duser", r.str("identity.consumer"));
    }
    p.add("suid", r.str("identity.subject"));
    p.add(
        "spriv",
        r.get("identity.scopes").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        }),
    );
    p.add("requestMethod", r.str("request.method"));
    p.add("request", path_and_query(&r));
    p.add("dhost", r.str("request.host"));
    p.add("requestClientApplication", r.str("request.user_agent"));
    if is_http(&r) {
        p.add("in", r.u64("request.bytes"));
        p.add("out", r.u64("response.bytes"));
    }
    p.labelled("cn1", "cn1Label", "status", status(&r));
    if kind == "request" {
        p.labelled(
            "cn2",
            "cn2Label",
            "latencyMicros",
            r.u64("response.latency_us"),
        );
    }
    p.labelled("cn3", "cn3Label", "seq", r.u64("seq"));
    p.labelled(
        "cs1",
        "cs1Label",
        "route",
        r.str("request.route_name")
            .or_else(|| r.str("request.route")),
    );
    p.labelled("cs2", "cs2Label", "keyId", r.str("identity.key_id"));
    p.labelled("cs3", "cs3Label", "upstream", r.str("upstream.name"));
    p.labelled("cs4", "cs4Label", "requestId", r.str("request_id"));
    p.labelled("cs5", "cs5Label", "authMethod", r.str("identity.method"));
    p.labelled("cs6", "cs6Label", "policy", r.str("decision.policy"));
    p.labelled("flexString1", "flexString1Label", "error", r.str("error"));
    p.labelled("flexString2", "flexString2Label", "phase", r.str("phase"));
    p.add("externalId", r.str("event_id"));
    p.add("dvchost", r.str("node"));
    p.add("msg", r.str("message"));

    let mut line = format!(
        "CEF:0|{}|{}|{}|{}|{}|{}|",
        cef_header(PRODUCT),
        cef_header(PRODUCT),
        cef_header(VERSION),
        cef_header(reason),
        cef_header(event_name(kind, outcome)),
        severity(event).score()
    );
    for (i, (k, v)) in p.0.iter().enumerate() {
        if i > 0 {
            line.push(' ');
        }
        line.push_str(k);
        line.push('=');
        line.push_str(&cef_value(v));
    }
    line
}

/// LEEF's attribute delimiter: a tab, declared in the header as `x09`.
const LEEF_DELIMITER: char = '\t';

/// Makes a LEEF attribute value safe: the delimiter (tab), newlines and other control
/// characters become a space, so a value can never start another attribute or event. LEEF
/// has no escape sequence for them.
fn leef_value(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == LEEF_DELIMITER || c.is_control() {
                ' '
            } else {
                c
            }
        })
        .collect()
}

/// The LEEF `devTimeFormat` (Java `SimpleDateFormat`) of `devTime`.
pub const LEEF_TIME_FORMAT: &str = "yyyy-MM-dd'T'HH:mm:ss.SSSX";

/// The event as a LEEF 2.0 line: `LEEF:2.0|apiwarden|apiwarden|VERSION|REASON|x09|` and
/// tab-separated `key=value` attributes (LEEF's own keys where there is one).
pub fn leef(event: &Value) -> String {
    let r = Record::new(event);
    let kind = r.peek("kind").unwrap_or("request");
    let reason = r.peek("decision.reason").unwrap_or("unknown");
    let mut p = Pairs::default();
    let time = r
        .str("time")
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .map(|t| humantime::format_rfc3339_millis(t).to_string());
    if time.is_some() {
        p.add("devTime", time);
        p.add("devTimeFormat", Some(LEEF_TIME_FORMAT));
    }
    p.add("cat", Some(kind));
    p.add("sev", Some(severity(event).score()));
    p.add("src", r.str("client.ip"));
    if r.peek("client.ip").is_some() {
        p.add("proto", Some("TCP"));
    }
    p.add("usrName", user_of(&r, kind));
    if kind == "admin" {
        p.add("consumer", r.str("identity.consumer"));
    }
    p.add("action", r.str("decision.outcome"));
    p.add("reason", r.str("decision.reason"));
    p.add("policy", r.str("decision.policy"));
    p.add("method", r.str("request.method"));
    p.add("url", path_and_query(&r));
    p.add("host", r.str("request.host"));
    p.add("status", status(&r));
    if is_http(&r) {
        p.add("srcBytes", r.u64("request.bytes"));
        p.add("dstBytes", r.u64("response.bytes"));
    }
    if kind == "request" {
        p.add("latencyMicros", r.u64("response.latency_us"));
    }
    p.add("userAgent", r.str("request.user_agent"));
    p.add(
        "route",
        r.str("request.route_name")
            .or_else(|| r.str("request.route")),
    );
    p.add("upstream", r.str("upstream.name"));
    p.add("keyId", r.str("identity.key_id"));
    p.add("authMethod", r.str("identity.method"));
    p.add("subject", r.str("identity.subject"));
    p.add(
        "scopes",
        r.get("identity.scopes").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        }),
    );
    p.add("requestId", r.str("request_id"));
    p.add("eventId", r.str("event_id"));
    p.add("seq", r.u64("seq"));
    p.add("error", r.str("error"));
    p.add("phase", r.str("phase"));
    p.add("node", r.str("node"));
    p.add("msg", r.str("message"));

    let mut line = format!(
        "LEEF:2.0|{}|{}|{}|{}|x09|",
        cef_header(PRODUCT),
        cef_header(PRODUCT),
        cef_header(VERSION),
        cef_header(reason),
    );
    for (i, (k, v)) in p.0.iter().enumerate() {
        if i > 0 {
            line.push(LEEF_DELIMITER);
        }
        line.push_str(k);
        line.push('=');
        line.push_str(&leef_value(v));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{AuditEvent, EventKind, Outcome, Reason};
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};
    use uuid::Uuid;

    /// 2026-11-25T12:00:00.123456Z
    const T: u64 = 1_795_608_000;

    /// The record as the ledger holds it (the canonical encoding, nulls included).
    fn record(e: &AuditEvent) -> Value {
        let mut buf = Vec::new();
        e.write_json(&mut buf);
        serde_json::from_slice(&buf).unwrap()
    }

    fn base(kind: EventKind) -> AuditEvent {
        let mut e = AuditEvent::new(kind, Uuid::from_u128(0xe1), Arc::from("node-a"));
        e.seq = 42;
        e.time = UNIX_EPOCH + Duration::from_micros(T * 1_000_000 + 123_456);
        e
    }

    fn allowed() -> Value {
        let mut e = base(EventKind::Request);
        e.request_id = Some(Uuid::from_u128(0x77));
        e.client.ip = Some("203.0.113.9".parse().unwrap());
        e.client.forwarded_for = Some("198.51.100.1, 10.0.0.2".into());
        e.identity.consumer = Some("billing".into());
        e.identity.key_id = Some("k1a2".into());
        e.identity.method = Some("api_key");
        e.identity.scopes = vec!["orders:read".into(), "orders:write".into()];
        e.request.method = Some("GET".into());
        e.request.host = Some("api.example.com".into());
        e.request.path = Some("/orders/42".into());
        e.request.route = Some(Arc::from("/orders/{id}"));
        e.request.route_name = Some(Arc::from("orders-read"));
        e.request.query = Some("page=REDACTED&user=hmac:abcd".into());
        e.request.user_agent = Some("curl/8.5.0".into());
        e.request.bytes = 120;
        e.request.headers_hmac = vec![("x-user".into(), "hmac:00ff".into())];
        e.response.status = 200;
        e.response.bytes = 2048;
        e.response.latency_us = 3_456;
        e.upstream.name = Some(Arc::from("orders"));
        e.upstream.target = Some(Arc::from("http://10.0.0.5:3000"));
        e.upstream.latency_us = Some(3_000);
        e.tls.version = Some("TLSv1.3");
        record(&e)
    }

    fn denied() -> Value {
        let mut e = base(EventKind::Request);
        e.request_id = Some(Uuid::from_u128(0x78));
        e.client.ip = Some("203.0.113.9".parse().unwrap());
        e.request.method = Some("DELETE".into());
        e.request.host = Some("api.example.com".into());
        e.request.path = Some("/orders/42".into());
        e.request.bytes = 0;
        e.response.status = 401;
        e.response.bytes = 60;
        e.response.latency_us = 90;
        e.decision.outcome = Outcome::Deny;
        e.decision.reason = Reason::AuthnMissing;
        record(&e)
    }

    fn admin() -> Value {
        let mut e = base(EventKind::Admin);
        e.decision.reason = Reason::AdminAction;
        e.decision.policy = Some("keys".into());
        e.actor = Some("cli:alice@host1".into());
        e.identity.key_id = Some("k9".into());
        e.identity.consumer = Some("billing".into());
        e.message = Some(
            "key k9 of consumer billing revoked by cli:alice@host1: its consumer was removed"
                .into(),
        );
        record(&e)
    }

    fn system() -> Value {
        let mut e = base(EventKind::System);
        e.decision.reason = Reason::LedgerRecordCut;
        e.message = Some("ledger: a torn record after seq 41 was cut (17 bytes)".into());
        record(&e)
    }

    fn assert_no_null(v: &Value, what: &str) {
        match v {
            Value::Null => panic!("a null in {what}"),
            Value::Array(a) => a.iter().for_each(|v| assert_no_null(v, what)),
            Value::Object(o) => o.values().for_each(|v| assert_no_null(v, what)),
            Value::String(s) => assert_ne!(s, "null", "{what}"),
            _ => {}
        }
    }

    /// A CEF line's seven header fields (unescaped) and its extension (unescaped values).
    fn parse_cef(line: &str) -> (Vec<String>, Vec<(String, String)>) {
        assert!(!line.contains('\n') && !line.contains('\r'), "{line}");
        let mut header = Vec::new();
        let mut field = String::new();
        let mut chars = line.chars();
        while header.len() < 7 {
            match chars.next().expect("7 header fields") {
                '\\' => field.push(chars.next().unwrap()),
                '|' => header.push(std::mem::take(&mut field)),
                c => field.push(c),
            }
        }
        let ext: String = chars.collect();
        // Split the extension at each unescaped `=`: the key is the last word before it.
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut raw = String::new();
        let mut it = ext.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                '\\' => {
                    raw.push('\\');
                    raw.push(it.next().unwrap());
                }
                '=' => {
                    let (before, key) = match raw.rfind(' ') {
                        Some(i) => (raw[..i].to_string(), raw[i + 1..].to_string()),
                        None => (String::new(), raw.clone()),
                    };
                    if let Some(last) = pairs.last_mut() {
                        last.1 = before;
                    } else {
                        assert!(before.is_empty());
                    }
                    pairs.push((key, String::new()));
                    raw.clear();
                }
                c => raw.push(c),
            }
        }
        if let Some(last) = pairs.last_mut() {
            last.1 = raw;
        }
        let unescape = |s: &str| {
            let mut out = String::new();
            let mut it = s.chars();
            while let Some(c) = it.next() {
                if c == '\\' {
                    match it.next().unwrap() {
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        c => out.push(c),
                    }
                } else {
                    out.push(c);
                }
            }
            out
        };
        let pairs = pairs
            .into_iter()
            .map(|(k, v)| {
                assert!(
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric()),
                    "key {k:?} in {line}"
                );
                (k, unescape(&v))
            })
            .collect();
        (header, pairs)
    }

    fn cef_get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A LEEF line's six header fields and its attributes.
    fn parse_leef(line: &str) -> (Vec<String>, Vec<(String, String)>) {
        assert!(!line.contains('\n') && !line.contains('\r'), "{line}");
        let parts: Vec<&str> = line.splitn(7, '|').collect();
        assert_eq!(parts.len(), 7, "{line}");
        let header = parts[..6].iter().map(|s| s.to_string()).collect();
        let attrs = parts[6]
            .split('\t')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{kv:?}"));
                (k.to_string(), v.to_string())
            })
            .collect();
        (header, attrs)
    }

    #[test]
    fn ocsf_request_allowed() {
        let o = ocsf(&allowed());
        assert_no_null(&o, "ocsf");
        assert_eq!(o["class_uid"], 6003);
        assert_eq!(o["category_uid"], 6);
        assert_eq!(o["activity_id"], 2);
        assert_eq!(o["activity_name"], "Read");
        assert_eq!(o["type_uid"], 600302);
        assert_eq!(o["time"], T * 1000 + 123);
        assert_eq!(o["status"], "Success");
        assert_eq!(o["status_id"], 1);
        assert_eq!(o["status_code"], "200");
        assert_eq!(o["status_detail"], "ok");
        assert_eq!(o["severity_id"], 1);
        assert_eq!(o["duration"], 3);
        let m = &o["metadata"];
        assert_eq!(m["version"], OCSF_VERSION);
        assert_eq!(m["product"]["name"], "apiwarden");
        assert_eq!(m["product"]["vendor_name"], "apiwarden");
        assert_eq!(m["uid"], Uuid::from_u128(0xe1).to_string());
        assert_eq!(m["correlation_uid"], Uuid::from_u128(0x77).to_string());
        assert_eq!(m["sequence"], 42);
        assert_eq!(o["actor"]["user"]["name"], "billing");
        assert_eq!(o["actor"]["user"]["uid"], "k1a2");
        assert_eq!(o["actor"]["authorizations"][0]["decision"], "allow");
        assert_eq!(o["src_endpoint"]["ip"], "203.0.113.9");
        let req = &o["http_request"];
        assert_eq!(req["http_method"], "GET");
        assert_eq!(req["url"]["hostname"], "api.example.com");
        assert_eq!(req["url"]["path"], "/orders/42");
        assert_eq!(
            req["url"]["query_string"], "page=REDACTED&user=hmac:abcd",
            "the redacted query as recorded"
        );
        assert_eq!(req["user_agent"], "curl/8.5.0");
        assert_eq!(req["length"], 120);
        assert_eq!(req["x_forwarded_for"], json!(["198.51.100.1", "10.0.0.2"]));
        assert_eq!(
            req["http_headers"],
            json!([{ "name": "x-user", "value": "hmac:00ff" }])
        );
        assert_eq!(o["http_response"]["code"], 200);
        assert_eq!(o["http_response"]["length"], 2048);
        assert_eq!(o["api"]["operation"], "GET /orders/{id}");
        assert_eq!(o["api"]["service"]["name"], "orders");
        assert_eq!(
            o["api"]["request"]["uid"],
            Uuid::from_u128(0x77).to_string()
        );
        // What has no OCSF field stays, as recorded.
        let u = &o["unmapped"];
        assert_eq!(u["node"], "node-a");
        assert_eq!(u["kind"], "request");
        assert_eq!(u["schema_version"], 1);
        assert_eq!(u["identity"]["method"], "api_key");
        assert_eq!(
            u["identity"]["scopes"],
            json!(["orders:read", "orders:write"])
        );
        assert_eq!(u["upstream"]["target"], "http://10.0.0.5:3000");
        assert_eq!(u["upstream"]["latency_us"], 3000);
        assert_eq!(u["request"]["route_name"], "orders-read");
        assert_eq!(u["tls"]["version"], "TLSv1.3");
        assert!(u.get("time").is_none() && u["request"].get("path").is_none());
    }

    #[test]
    fn ocsf_request_denied() {
        let o = ocsf(&denied());
        assert_no_null(&o, "ocsf");
        assert_eq!(o["activity_id"], 4);
        assert_eq!(o["type_uid"], 600304);
        assert_eq!(o["status"], "Failure");
        assert_eq!(o["status_id"], 2);
        assert_eq!(o["status_code"], "401");
        assert_eq!(o["status_detail"], "authn.missing");
        assert_eq!(o["severity_id"], 3);
        assert_eq!(o["api"]["operation"], "DELETE /orders/42");
        assert!(o["actor"].get("user").is_none(), "no identity: no user");
        assert_eq!(o["actor"]["authorizations"][0]["decision"], "deny");
        assert!(o["api"].get("service").is_none());
    }

    #[test]
    fn ocsf_admin_and_system_events() {
        let o = ocsf(&admin());
        assert_no_null(&o, "ocsf");
        assert_eq!(o["activity_id"], 4, "revoked: Delete");
        assert_eq!(o["type_uid"], 600304);
        assert_eq!(o["actor"]["user"]["name"], "cli:alice@host1");
        assert_eq!(o["api"]["operation"], "keys.revoked");
        assert_eq!(o["api"]["service"]["name"], "keys");
        assert_eq!(
            o["resources"],
            json!([{ "type": "api_key", "uid": "k9" }, { "type": "consumer", "name": "billing" }])
        );
        assert!(o["message"].as_str().unwrap().contains("revoked"));
        assert!(o.get("http_request").is_none() && o.get("status_code").is_none());

        let o = ocsf(&system());
        assert_no_null(&o, "ocsf");
        assert_eq!(o["activity_id"], 99);
        assert_eq!(o["type_uid"], 600399);
        assert_eq!(o["type_name"], "API Activity: Other");
        assert_eq!(o["severity_id"], 4, "a cut ledger record is serious");
        assert_eq!(o["status_detail"], "ledger.record_cut");
        assert_eq!(o["actor"]["app_name"], "apiwarden");
        assert_eq!(o["api"]["operation"], "system");
        assert!(o.get("http_request").is_none() && o.get("src_endpoint").is_none());
        assert_eq!(o["unmapped"]["kind"], "system");
    }

    #[test]
    fn ocsf_type_uid_is_class_times_100_plus_activity() {
        for (method, id) in [
            ("POST", 1),
            ("GET", 2),
            ("HEAD", 2),
            ("PUT", 3),
            ("PATCH", 3),
            ("DELETE", 4),
            ("OPTIONS", 99),
            ("CONNECT", 99),
        ] {
            let mut e = allowed();
            e["request"]["method"] = json!(method);
            let o = ocsf(&e);
            assert_eq!(o["activity_id"], id, "{method}");
            let class = o["class_uid"].as_u64().unwrap();
            assert_eq!(o["type_uid"], class * 100 + id, "{method}");
        }
        for (message, id) in [
            ("key k of consumer c created by cli:a@b", 1),
            ("block list: added ip 10.0.0.1 until removed; reason: x", 1),
            ("key k of consumer c rotated by cli:a@b: new key", 3),
            ("consumer updated billing by cli", 3),
            ("block list: ip 10.0.0.1 expired", 4),
            ("something else", 99),
        ] {
            let mut e = admin();
            e["message"] = json!(message);
            assert_eq!(ocsf(&e)["activity_id"], id, "{message}");
            assert_eq!(ocsf(&e)["type_uid"], 600300 + id, "{message}");
        }
    }

    #[test]
    fn ecs_request_allowed_and_denied() {
        let o = ecs(&allowed());
        assert_no_null(&o, "ecs");
        assert_eq!(o["@timestamp"], "2026-11-25T12:00:00.123456Z");
        assert_eq!(o["ecs"]["version"], ECS_VERSION);
        let ev = &o["event"];
        assert_eq!(ev["kind"], "event");
        assert_eq!(ev["category"], json!(["web"]));
        assert_eq!(ev["type"], json!(["access"]));
        assert_eq!(ev["outcome"], "success");
        assert_eq!(ev["action"], "allow");
        assert_eq!(ev["reason"], "ok");
        assert_eq!(ev["id"], Uuid::from_u128(0xe1).to_string());
        assert_eq!(ev["sequence"], 42);
        assert_eq!(ev["duration"], 3_456_000, "nanoseconds");
        assert_eq!(o["http"]["request"]["method"], "GET");
        assert_eq!(
            o["http"]["request"]["id"],
            Uuid::from_u128(0x77).to_string()
        );
        assert_eq!(o["http"]["request"]["bytes"], 120);
        assert_eq!(o["http"]["response"]["status_code"], 200);
        assert_eq!(o["http"]["response"]["bytes"], 2048);
        assert_eq!(o["url"]["domain"], "api.example.com");
        assert_eq!(o["url"]["path"], "/orders/42");
        assert_eq!(o["url"]["query"], "page=REDACTED&user=hmac:abcd");
        assert_eq!(o["client"]["ip"], "203.0.113.9");
        assert_eq!(o["source"]["ip"], "203.0.113.9");
        assert_eq!(o["user"]["name"], "billing");
        assert_eq!(o["user_agent"]["original"], "curl/8.5.0");
        assert_eq!(o["observer"]["name"], "node-a");
        assert_eq!(o["observer"]["product"], "apiwarden");
        assert_eq!(o["observer"]["vendor"], "apiwarden");
        assert_eq!(o["tls"]["version"], "1.3");
        assert_eq!(o["tls"]["version_protocol"], "tls");
        assert_eq!(o["apiwarden"]["identity"]["key_id"], "k1a2");
        assert_eq!(o["apiwarden"]["request"]["route"], "/orders/{id}");
        assert_eq!(o["apiwarden"]["upstream"]["name"], "orders");
        assert_eq!(
            o["apiwarden"]["request"]["headers_hmac"]["x-user"],
            "hmac:00ff"
        );

        let o = ecs(&denied());
        assert_no_null(&o, "ecs");
        assert_eq!(o["event"]["outcome"], "failure");
        assert_eq!(o["event"]["action"], "deny");
        assert_eq!(o["event"]["reason"], "authn.missing");
        assert_eq!(o["http"]["response"]["status_code"], 401);
        assert!(o.get("user").is_none() && o.get("user_agent").is_none());
    }

    #[test]
    fn ecs_admin_and_system_events() {
        let o = ecs(&admin());
        assert_no_null(&o, "ecs");
        assert_eq!(o["event"]["category"], json!(["iam"]));
        assert_eq!(o["event"]["type"], json!(["admin", "deletion"]));
        assert_eq!(o["event"]["action"], "keys-revoked");
        assert_eq!(o["user"]["name"], "cli:alice@host1");
        assert_eq!(o["user"]["target"]["name"], "billing");
        assert_eq!(o["related"]["user"], json!(["cli:alice@host1", "billing"]));
        assert_eq!(o["apiwarden"]["identity"]["key_id"], "k9");
        assert!(o.get("http").is_none() && o["event"].get("duration").is_none());

        let o = ecs(&system());
        assert_no_null(&o, "ecs");
        assert_eq!(o["event"]["category"], json!(["process"]));
        assert_eq!(o["event"]["reason"], "ledger.record_cut");
        assert_eq!(o["event"]["severity"], 8);
        assert!(o["message"].as_str().unwrap().contains("torn"));
    }

    #[test]
    fn cef_request_allowed_and_denied() {
        let line = cef(&allowed());
        let (h, x) = parse_cef(&line);
        assert_eq!(
            h,
            [
                "CEF:0",
                "apiwarden",
                "apiwarden",
                VERSION,
                "ok",
                "request allowed",
                "1"
            ]
        );
        let get = |k| cef_get(&x, k);
        assert_eq!(get("rt"), Some((T * 1000 + 123).to_string().as_str()));
        assert_eq!(get("src"), Some("203.0.113.9"));
        assert_eq!(get("suser"), Some("billing"));
        assert_eq!(get("requestMethod"), Some("GET"));
        assert_eq!(
            get("request"),
            Some("/orders/42?page=REDACTED&user=hmac:abcd")
        );
        assert_eq!(get("requestClientApplication"), Some("curl/8.5.0"));
        assert_eq!(get("outcome"), Some("success"));
        assert_eq!(get("act"), Some("allow"));
        assert_eq!(get("cs1"), Some("orders-read"));
        assert_eq!(get("cs1Label"), Some("route"));
        assert_eq!(get("cs2"), Some("k1a2"));
        assert_eq!(get("cs4"), Some(Uuid::from_u128(0x77).to_string().as_str()));
        assert_eq!(get("cn1"), Some("200"));
        assert_eq!(get("cn1Label"), Some("status"));
        assert_eq!(get("cn3"), Some("42"));
        assert_eq!(get("in"), Some("120"));
        assert_eq!(get("out"), Some("2048"));
        assert_eq!(get("spriv"), Some("orders:read,orders:write"));
        assert_eq!(get("dvchost"), Some("node-a"));
        assert!(get("msg").is_none() && get("flexString1").is_none());
        assert!(!line.contains("null"), "{line}");
        // The `=` of the query is escaped in the line itself.
        assert!(line.contains("request=/orders/42?page\\=REDACTED&user\\=hmac:abcd"));

        let (h, x) = parse_cef(&cef(&denied()));
        assert_eq!(h[4], "authn.missing");
        assert_eq!(h[5], "request denied");
        assert_eq!(h[6], "5");
        assert_eq!(cef_get(&x, "outcome"), Some("failure"));
        assert_eq!(cef_get(&x, "reason"), Some("authn.missing"));
        assert_eq!(cef_get(&x, "cn1"), Some("401"));
        assert!(cef_get(&x, "suser").is_none() && cef_get(&x, "cs2").is_none());
    }

    #[test]
    fn cef_admin_and_system_events() {
        let line = cef(&admin());
        let (h, x) = parse_cef(&line);
        assert_eq!(h[4], "admin.action");
        assert_eq!(h[5], "admin action");
        assert_eq!(cef_get(&x, "cat"), Some("admin"));
        assert_eq!(cef_get(&x, "suser"), Some("cli:alice@host1"));
        assert_eq!(cef_get(&x, "duser"), Some("billing"));
        assert_eq!(cef_get(&x, "cs6"), Some("keys"));
        assert!(cef_get(&x, "msg").unwrap().contains("revoked"));
        assert!(cef_get(&x, "cn1").is_none(), "no response: no status");
        assert!(!line.contains("null"));

        let (h, x) = parse_cef(&cef(&system()));
        assert_eq!(h[4], "ledger.record_cut");
        assert_eq!(h[5], "system event");
        assert_eq!(h[6], "8");
        assert_eq!(cef_get(&x, "cat"), Some("system"));
        assert!(cef_get(&x, "src").is_none() && cef_get(&x, "in").is_none());
    }

    const NASTY: &str = "/a|b=c\\d\te\nf\rg";

    #[test]
    fn cef_escapes_pipes_equals_backslashes_and_newlines() {
        assert_eq!(cef_header("a|b\\c"), "a\\|b\\\\c");
        assert_eq!(cef_header("a\nb"), "a b");
        assert_eq!(cef_value("a|b=c\\d\ne\rf"), "a|b\\=c\\\\d\\ne\\rf");
        let mut e = allowed();
        e["request"]["path"] = json!(NASTY);
        e["request"]["query"] = Value::Null;
        e["request"]["user_agent"] = json!(format!("ua {NASTY} src=6.6.6.6"));
        let line = cef(&e);
        assert!(!line.contains('\n') && !line.contains('\r'));
        let (h, x) = parse_cef(&line);
        assert_eq!(h.len(), 7);
        assert_eq!(cef_get(&x, "request"), Some(NASTY));
        assert_eq!(
            cef_get(&x, "requestClientApplication"),
            Some(format!("ua {NASTY} src=6.6.6.6").as_str())
        );
        assert_eq!(
            x.iter().filter(|(k, _)| k == "src").count(),
            1,
            "a value cannot add a key"
        );
        assert_eq!(cef_get(&x, "src"), Some("203.0.113.9"));
    }

    #[test]
    fn leef_request_allowed_and_denied() {
        let line = leef(&allowed());
        let (h, a) = parse_leef(&line);
        assert_eq!(
            h,
            ["LEEF:2.0", "apiwarden", "apiwarden", VERSION, "ok", "x09"]
        );
        let get = |k| cef_get(&a, k);
        assert_eq!(get("devTime"), Some("2026-11-25T12:00:00.123Z"));
        assert_eq!(get("devTimeFormat"), Some(LEEF_TIME_FORMAT));
        assert_eq!(get("src"), Some("203.0.113.9"));
        assert_eq!(get("proto"), Some("TCP"));
        assert_eq!(get("usrName"), Some("billing"));
        assert_eq!(get("cat"), Some("request"));
        assert_eq!(get("sev"), Some("1"));
        assert_eq!(get("method"), Some("GET"));
        assert_eq!(get("url"), Some("/orders/42?page=REDACTED&user=hmac:abcd"));
        assert_eq!(get("status"), Some("200"));
        assert_eq!(get("srcBytes"), Some("120"));
        assert_eq!(get("dstBytes"), Some("2048"));
        assert_eq!(
            get("requestId"),
            Some(Uuid::from_u128(0x77).to_string().as_str())
        );
        assert_eq!(get("route"), Some("orders-read"));
        assert_eq!(get("keyId"), Some("k1a2"));
        assert!(!line.contains("null"), "{line}");

        let (h, a) = parse_leef(&leef(&denied()));
        assert_eq!(h[4], "authn.missing");
        assert_eq!(cef_get(&a, "action"), Some("deny"));
        assert_eq!(cef_get(&a, "sev"), Some("5"));
        assert_eq!(cef_get(&a, "status"), Some("401"));
        assert!(cef_get(&a, "usrName").is_none());
    }

    #[test]
    fn leef_admin_and_system_events() {
        let (h, a) = parse_leef(&leef(&admin()));
        assert_eq!(h[4], "admin.action");
        assert_eq!(cef_get(&a, "usrName"), Some("cli:alice@host1"));
        assert_eq!(cef_get(&a, "consumer"), Some("billing"));
        assert_eq!(cef_get(&a, "policy"), Some("keys"));
        assert!(cef_get(&a, "msg").unwrap().contains("revoked"));
        assert!(cef_get(&a, "status").is_none() && cef_get(&a, "proto").is_none());

        let (h, a) = parse_leef(&leef(&system()));
        assert_eq!(h[4], "ledger.record_cut");
        assert_eq!(cef_get(&a, "cat"), Some("system"));
        assert_eq!(cef_get(&a, "sev"), Some("8"));
    }

    #[test]
    fn leef_values_cannot_split_an_attribute_or_a_line() {
        let mut e = allowed();
        e["request"]["path"] = json!(NASTY);
        e["request"]["query"] = Value::Null;
        e["request"]["user_agent"] = json!(format!("ua\tsrc=6.6.6.6\n{NASTY}"));
        let line = leef(&e);
        let (h, a) = parse_leef(&line);
        assert_eq!(h.len(), 6);
        assert_eq!(cef_get(&a, "url"), Some("/a|b=c\\d e f g"));
        assert_eq!(
            cef_get(&a, "userAgent"),
            Some("ua src=6.6.6.6 /a|b=c\\d e f g")
        );
        assert_eq!(a.iter().filter(|(k, _)| k == "src").count(), 1);
        assert_eq!(cef_get(&a, "src"), Some("203.0.113.9"));
    }

    #[test]
    fn absent_fields_are_left_out_in_every_format() {
        // A blank event: almost everything null.
        let e = record(&AuditEvent::new(
            EventKind::Request,
            Uuid::nil(),
            Arc::from(""),
        ));
        for f in [Format::Ocsf, Format::Ecs] {
            let v: Value = serde_json::from_str(&to_line(f, &e)).unwrap();
            assert_no_null(&v, f.as_str());
        }
        for f in [Format::Cef, Format::Leef] {
            let line = to_line(f, &e);
            assert!(!line.contains("null"), "{line}");
            assert!(!line.contains("=\t") && !line.ends_with('='), "{line}");
        }
        let (_, x) = parse_cef(&cef(&e));
        assert!(x.iter().all(|(_, v)| !v.is_empty()));
        assert!(cef_get(&x, "request").is_none() && cef_get(&x, "src").is_none());
    }

    #[test]
    fn formats_parse_by_name() {
        for f in Format::ALL {
            assert_eq!(Format::parse(f.as_str()), Some(f));
        }
        assert_eq!(Format::parse("syslog"), None);
    }
}
