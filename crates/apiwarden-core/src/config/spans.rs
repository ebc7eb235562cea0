//! A position index over a TOML document: every value's byte span, found by its key path.
//!
//! Stage one of config validation deserialises plain serde types; this index lets every error of
//! either stage point at the file, line and column of the value it is about.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::ops::Range;
use toml::Spanned;

/// One value of the document with the spans of everything below it.
#[derive(Debug)]
pub(crate) enum Node {
    Table(BTreeMap<String, Spanned<Node>>),
    Array(Vec<Spanned<Node>>),
    Leaf,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a TOML value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_string<E>(self, _: String) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<Node>>()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<Spanned<Node>>()?;
                    entries.insert(key, value);
                }
                Ok(Node::Table(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// A step of a key path: a table key or an array index.
#[derive(Clone, Debug)]
pub(crate) enum Key {
    Name(&'static str),
    Owned(String),
    Index(usize),
}

/// Finds the span of the deepest value along `path` that exists.
pub(crate) fn locate(root: &Node, path: &[Key]) -> Option<Range<usize>> {
    let mut node = root;
    let mut span = None;
    for key in path {
        let next = match (node, key) {
            (Node::Table(t), Key::Name(n)) => t.get(*n),
            (Node::Table(t), Key::Owned(n)) => t.get(n.as_str()),
            (Node::Array(a), Key::Index(i)) => a.get(*i),
            _ => None,
        };
        match next {
            Some(s) => {
                span = Some(s.span());
                node = s.get_ref();
            }
            None => break,
        }
    }
    span
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}
