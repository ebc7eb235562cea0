//! The block list's entries: who is refused with `403 blocked`, why, by whom and until when.

use crate::net::IpNet;
use serde::{Deserialize, Serialize};

/// What an entry blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// A client IP address or CIDR network.
    Ip,
    /// An API key, by key id.
    Key,
    /// A consumer, by name.
    Consumer,
}

impl BlockKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockKind::Ip => "ip",
            BlockKind::Key => "key",
            BlockKind::Consumer => "consumer",
        }
    }

    pub fn parse(s: &str) -> Result<BlockKind, String> {
        match s {
            "ip" => Ok(BlockKind::Ip),
            "key" => Ok(BlockKind::Key),
            "consumer" => Ok(BlockKind::Consumer),
            other => Err(format!(
                "{other:?} is not something that can be blocked: use ip, key or consumer"
            )),
        }
    }

    /// The canonical form of a value of this kind, or why it is not one.
    pub fn normalize(self, value: &str) -> Result<String, String> {
        let value = value.trim();
        match self {
            BlockKind::Ip => IpNet::parse(value).map(|n| n.canonical().to_string()),
            BlockKind::Key | BlockKind::Consumer => {
                if value.is_empty()
                    || value.len() > 200
                    || !value.bytes().all(|b| b.is_ascii_graphic())
                {
                    Err(format!(
                        "a {} must be 1 to 200 printable characters without spaces",
                        if self == BlockKind::Key {
                            "key id"
                        } else {
                            "consumer name"
                        }
                    ))
                } else {
                    Ok(value.to_string())
                }
            }
        }
    }
}

/// One entry of the block list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEntry {
    pub kind: BlockKind,
    pub value: String,
    pub reason: String,
    /// Who added it: `cli:USER@HOST`, `detect:RULE`, an admin token's name.
    pub actor: String,
    /// Unix time in milliseconds.
    pub created_at: u64,
    /// Unix time in milliseconds; `None` blocks until removed.
    pub expires_at: Option<u64>,
}

impl BlockEntry {
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at.is_some_and(|t| t <= now_ms)
    }
}

/// What happened to the block list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockAction {
    Add,
    Remove,
    Expire,
}

/// One change of the block list, as the store keeps it for every node to audit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockChange {
    /// The store's position of this change (an integer in SQLite, a stream id in Redis).
    pub id: String,
    pub action: BlockAction,
    /// Unix time in milliseconds.
    pub at: u64,
    pub entry: BlockEntry,
    /// Who made the change (for `remove`, who removed it; for `expire`, `system`).
    pub by: String,
}

impl BlockChange {
    /// A sentence for the audit event.
    pub fn describe(&self) -> String {
        let e = &self.entry;
        let what = format!("{} {}", e.kind.as_str(), e.value);
        match self.action {
            BlockAction::Add => {
                let until = match e.expires_at {
                    Some(t) => format!(
                        "until {}",
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_millis(t)
                        )
                    ),
                    None => "until removed".to_string(),
                };
                format!("block list: added {what} {until}; reason: {}", e.reason)
            }
            BlockAction::Remove => format!("block list: removed {what}"),
            BlockAction::Expire => format!("block list: {what} expired"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_and_made_canonical() {
        assert_eq!(BlockKind::Ip.normalize(" 10.0.0.1 ").unwrap(), "10.0.0.1");
        assert_eq!(
            BlockKind::Ip.normalize("10.1.0.0/16").unwrap(),
            "10.1.0.0/16"
        );
        assert!(BlockKind::Ip.normalize("10.0.0.300").is_err());
        assert!(BlockKind::Key.normalize("has space").is_err());
        assert_eq!(BlockKind::Consumer.normalize("billing").unwrap(), "billing");
        assert!(BlockKind::parse("user")
            .unwrap_err()
            .contains("ip, key or consumer"));
    }
}
