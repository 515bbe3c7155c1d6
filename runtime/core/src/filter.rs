//! A manifest's `[filter]`: which events reach the handler, decided in the host before a
//! sandbox is instantiated. An event that does not match is committed as handled, with no
//! effects, and counted (`spate_events_total{outcome="filtered"}`).
//!
//! Every condition given must hold (an empty filter lets everything through); a condition
//! given a list holds if any of its values does:
//!
//! ```toml
//! [filter]
//! key-prefix = ["eu-", "uk-"]           # the key starts with one of these
//! headers = { type = "order" }          # header `type` is present and equals "order"
//! has-headers = ["trace-id"]            # header `trace-id` is present
//! fields = { op = "count", v = [1, 2] } # the payload is a JSON object whose top-level
//!                                       # `op` is "count" and `v` is 1 or 2
//! ```

use crate::types::Event;
use serde::Deserializer as _;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// One value, or a list of alternatives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// Any of these (first: a JSON value would take a list as one value).
    Many(Vec<T>),
    /// A single value.
    One(T),
}

impl<T> OneOrMany<T> {
    /// The values, one or many.
    pub fn values(&self) -> &[T] {
        match self {
            Self::One(v) => std::slice::from_ref(v),
            Self::Many(v) => v,
        }
    }
}

/// The `[filter]` section of a manifest; see the [module docs](self).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Filter {
    /// The key starts with one of these (compared as bytes; a keyless event fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<OneOrMany<String>>,
    /// Each named header is present and its value (as UTF-8) is one of these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, OneOrMany<String>>,
    /// Each named header is present, with any value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub has_headers: Vec<String>,
    /// The payload is a JSON object and each named top-level field equals one of these
    /// (numbers compare by value: `1` equals `1.0`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, OneOrMany<Value>>,
}

impl Filter {
    /// Whether the filter lets every event through.
    pub fn is_empty(&self) -> bool {
        self.key_prefix.is_none()
            && self.headers.is_empty()
            && self.has_headers.is_empty()
            && self.fields.is_empty()
    }

    /// What is wrong with the filter, one line per problem (prefixed `filter.`).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(prefixes) = &self.key_prefix {
            if prefixes.values().is_empty() {
                problems.push("filter.key-prefix: give at least one prefix".into());
            }
            if prefixes.values().iter().any(String::is_empty) {
                problems.push(
                    "filter.key-prefix: an empty prefix matches every keyed event; remove it"
                        .into(),
                );
            }
        }
        for (name, values) in &self.headers {
            if name.is_empty() {
                problems.push("filter.headers: a header name is empty".into());
            }
            if values.values().is_empty() {
                problems.push(format!(
                    "filter.headers.{name}: give at least one value (or use has-headers for presence)"
                ));
            }
        }
        if self.has_headers.iter().any(String::is_empty) {
            problems.push("filter.has-headers: a header name is empty".into());
        }
        for (name, values) in &self.fields {
            if name.is_empty() {
                problems.push("filter.fields: a field name is empty".into());
            }
            if values.values().is_empty() {
                problems.push(format!("filter.fields.{name}: give at least one value"));
            }
            if values
                .values()
                .iter()
                .any(|v| matches!(v, Value::Object(_) | Value::Array(_)))
            {
                problems.push(format!(
                    "filter.fields.{name}: compare with strings, numbers or booleans (a list means any of them)"
                ));
            }
        }
        problems
    }

    /// Whether `event` reaches the handler.
    pub fn matches(&self, event: &Event) -> bool {
        if let Some(prefixes) = &self.key_prefix {
            let Some(key) = &event.key else {
                return false;
            };
            if !prefixes
                .values()
                .iter()
                .any(|p| key.starts_with(p.as_bytes()))
            {
                return false;
            }
        }
        for (name, values) in &self.headers {
            let found = event.headers.iter().any(|h| {
                h.name == *name && values.values().iter().any(|v| h.value == v.as_bytes())
            });
            if !found {
                return false;
            }
        }
        for name in &self.has_headers {
            if !event.headers.iter().any(|h| h.name == *name) {
                return false;
            }
        }
        if self.fields.is_empty() {
            return true;
        }
        let mut de = serde_json::Deserializer::from_slice(&event.payload);
        let Ok(found) = de.deserialize_map(FieldsOf(&self.fields)) else {
            return false; // not a JSON object
        };
        self.fields.iter().zip(found).all(|((_, wanted), got)| {
            got.is_some_and(|got| wanted.values().iter().any(|w| json_eq(w, &got)))
        })
    }
}

/// JSON equality with numbers compared by value.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

/// Reads a JSON object's top-level fields named in the filter (in the filter's order),
/// skipping the rest without building them.
struct FieldsOf<'a>(&'a BTreeMap<String, OneOrMany<Value>>);

impl<'de> Visitor<'de> for FieldsOf<'_> {
    type Value = Vec<Option<Value>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = vec![None; self.0.len()];
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match self.0.keys().position(|k| *k == key) {
                Some(i) => found[i] = Some(map.next_value::<Value>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::types::Header;

    fn filter(toml_text: &str) -> Filter {
        toml::from_str(toml_text).unwrap()
    }

    fn event(key: Option<&str>, headers: &[(&str, &str)], payload: &str) -> Event {
        Event {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: key.map(|k| k.as_bytes().to_vec()),
            payload: payload.as_bytes().to_vec(),
            headers: headers.iter().map(|(n, v)| Header::text(*n, *v)).collect(),
            timestamp_ms: 0,
        }
    }

    #[test]
    fn an_empty_filter_lets_everything_through() {
        let f = filter("");
        assert!(f.is_empty());
        assert!(f.matches(&event(None, &[], "not json")));
    }

    #[test]
    fn key_prefixes_match_any_and_keyless_events_fail() {
        let f = filter(r#"key-prefix = ["eu-", "uk-"]"#);
        assert!(f.matches(&event(Some("eu-1"), &[], "")));
        assert!(f.matches(&event(Some("uk-2"), &[], "")));
        assert!(!f.matches(&event(Some("us-1"), &[], "")));
        assert!(!f.matches(&event(None, &[], "")));
        assert!(filter(r#"key-prefix = "eu-""#).matches(&event(Some("eu-1"), &[], "")));
    }

    #[test]
    fn headers_match_by_value_or_presence() {
        let f = filter("headers = { type = [\"order\", \"refund\"] }\nhas-headers = [\"trace\"]");
        assert!(f.matches(&event(None, &[("type", "order"), ("trace", "")], "")));
        assert!(f.matches(&event(None, &[("type", "refund"), ("trace", "x")], "")));
        assert!(!f.matches(&event(None, &[("type", "order")], "")));
        assert!(!f.matches(&event(None, &[("type", "other"), ("trace", "x")], "")));
    }

    #[test]
    fn fields_compare_top_level_json_values() {
        let f = filter("fields = { op = \"count\", v = [1, 2.5], ok = true }");
        let m = |p: &str| f.matches(&event(None, &[], p));
        assert!(m(r#"{"op":"count","v":1,"ok":true,"big":{"op":"x"}}"#));
        assert!(m(r#"{"v":2.5,"ok":true,"op":"count"}"#));
        assert!(
            m(r#"{"op":"count","v":1.0,"ok":true}"#),
            "numbers compare by value"
        );
        assert!(!m(r#"{"op":"count","v":3,"ok":true}"#));
        assert!(!m(r#"{"op":"count","ok":true}"#), "a missing field fails");
        assert!(
            !m(r#"{"nested":{"op":"count","v":1,"ok":true}}"#),
            "top level only"
        );
        assert!(!m("[1,2]"));
        assert!(!m("not json"));
        assert!(!m(""));
    }

    #[test]
    fn problems_name_what_to_fix() {
        let f = filter("key-prefix = [\"\"]\nfields = { a = { b = 1 }, c = [] }");
        let p = f.problems().join("\n");
        assert!(p.contains("filter.key-prefix"), "{p}");
        assert!(p.contains("filter.fields.a"), "{p}");
        assert!(p.contains("filter.fields.c"), "{p}");
        assert!(filter("has-headers = [\"x\"]").problems().is_empty());
    }
}
