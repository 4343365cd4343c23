//! The one error type of this crate: a list of problems, each with the key path it concerns;
//! and [`ConfigWarning`], a legal setting worth a second look.

use std::fmt;

use thiserror::Error;

/// One problem in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", render(path, message))]
pub struct ConfigError {
    /// Dotted key path with array indexes, as written in the TOML: `upstream.url`,
    /// `route[2].filter`, `broker.listeners[0]`. Empty when the problem is not tied to a key
    /// (a TOML syntax error; the message then carries the line and column).
    pub path: String,
    /// What is wrong, and where possible what would be right.
    pub message: String,
}

fn render(path: &str, message: &str) -> String {
    if path.is_empty() {
        message.to_owned()
    } else {
        format!("{path}: {message}")
    }
}

impl ConfigError {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A setting that is valid but probably not what was meant: [`crate::Config::warnings`] lists
/// them, `outpost check-config` and start-up print them. Never stops a configuration from loading.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", render(path, message))]
pub struct ConfigWarning {
    /// The key it concerns, as in [`ConfigError::path`].
    pub path: String,
    /// What may go wrong, and why.
    pub message: String,
}

impl ConfigWarning {
    /// A warning about `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Every problem found in a configuration, in file order where possible. Never empty when
/// returned by [`crate::Config::load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The problems, in the order they were found.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// Whether a problem was reported at exactly `path`.
    pub fn has_path(&self, path: &str) -> bool {
        self.0.iter().any(|e| e.path == path)
    }
}

/// One problem per line.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Collects problems during validation so that one bad key never hides the next.
#[derive(Debug, Default)]
pub(crate) struct Collector {
    errors: Vec<ConfigError>,
}

impl Collector {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl fmt::Display) {
        self.errors
            .push(ConfigError::new(path, message.to_string()));
    }

    /// `Ok(value)` if nothing was reported, else every problem.
    pub(crate) fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}
