//! `Duration`s in configuration files as whole milliseconds (`…-ms` keys), for
//! `#[serde(with = "spate_core::millis")]` on the backends' settings.

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

/// Write `d` as milliseconds.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Read milliseconds into a `Duration`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde::Serialize;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct S {
        #[serde(with = "super")]
        timeout_ms: Duration,
    }

    #[test]
    fn milliseconds_round_trip() {
        let s: S = toml::from_str("timeout_ms = 1500").unwrap();
        assert_eq!(s.timeout_ms, Duration::from_millis(1500));
        assert_eq!(toml::to_string(&s).unwrap().trim(), "timeout_ms = 1500");
    }
}
