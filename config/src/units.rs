//! Byte sizes and durations as written in the config file.

use std::time::Duration;

use thiserror::Error;

/// Why a string is not a byte size.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    /// Not `<digits>[unit]`, or an unknown unit.
    #[error(
        "invalid size {0:?}; expected a whole number with an optional unit: B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
    )]
    Invalid(String),
    /// The number of bytes does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a byte size: `"1048576"`, `"100KiB"`, `"512 MiB"`, `"1GB"`. Units are case-insensitive;
/// `KB`/`MB`/`GB`/`TB` are powers of 1000, `KiB`/`MiB`/`GiB`/`TiB` powers of 1024.
///
/// Only whole numbers: `"1.5GiB"` is refused rather than rounded, so the stored number is exactly
/// what was written.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(text.to_owned());
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(invalid());
    }
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(invalid()),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_owned()))?;
    number
        .checked_mul(multiplier)
        .ok_or_else(|| SizeError::Overflow(text.to_owned()))
}

/// Why a string is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid duration {text:?} ({reason}); write e.g. \"500ms\", \"30s\", \"5m\" or \"7d\"")]
pub struct DurationError {
    text: String,
    reason: String,
}

/// Parses a duration with humantime (`"500ms"`, `"30s"`, `"1h 30m"`, `"7d"`; `"0"` is zero).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(text.trim()).map_err(|e| DurationError {
        text: text.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("1048576", 1_048_576),
            ("0", 0),
            ("512MiB", 512 << 20),
            ("1GB", 1_000_000_000),
            ("100KiB", 102_400),
            ("100 kib", 102_400),
            ("4KB", 4_000),
            ("7B", 7),
            ("1TiB", 1 << 40),
            (" 256KiB ", 256 << 10),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "MiB", "12XB", "1.5GiB", "-1", "1 2MiB", "1MiBx"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("17000000TiB"),
            Err(SizeError::Overflow(_))
        ));
        assert!(
            parse_size("12XB")
                .unwrap_err()
                .to_string()
                .starts_with("invalid size \"12XB\"")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
