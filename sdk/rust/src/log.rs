//! Logging into the runtime's log, tagged by the host with the plugin and event
//! (the WIT `log` interface).
//!
//! Use the functions with a ready string, or the crate's [`trace!`](crate::trace),
//! [`debug!`](crate::debug), [`info!`](crate::info), [`warn!`](crate::warn) and
//! [`error!`](crate::error) macros with `format!` arguments. Unlike state and emits,
//! log lines are written even when the handler fails: they explain the failure.

use crate::wit::log as host;

/// Severity of a log line.
pub use crate::wit::types::Level;

/// Write `message` at `level`.
pub fn log(level: Level, message: &str) {
    host::log(level, message);
}

/// Write `message` at trace level (very detailed diagnostics).
pub fn trace(message: &str) {
    log(Level::Trace, message);
}

/// Write `message` at debug level (diagnostics while developing a handler).
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Write `message` at info level (normal operation).
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Write `message` at warn level (something unexpected the handler recovered from).
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Write `message` at error level (something failed).
pub fn error(message: &str) {
    log(Level::Error, message);
}

/// Log at trace level with `format!` arguments: `spate_sdk::trace!("read {key}")`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log::trace(&::std::format!($($arg)+)) };
}

/// Log at debug level with `format!` arguments: `spate_sdk::debug!("read {key}")`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log::debug(&::std::format!($($arg)+)) };
}

/// Log at info level with `format!` arguments: `spate_sdk::info!("order {id} counted")`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log::info(&::std::format!($($arg)+)) };
}

/// Log at warn level with `format!` arguments: `spate_sdk::warn!("no profile for {c}")`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log::warn(&::std::format!($($arg)+)) };
}

/// Log at error level with `format!` arguments: `spate_sdk::error!("bad total {t}")`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log::error(&::std::format!($($arg)+)) };
}
