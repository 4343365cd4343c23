//! The broker's two access files, in mosquitto's formats so that mosquitto's tools and habits
//! carry over: the password file `mosquitto_passwd` writes, and the ACL file.
//!
//! Both are parsed completely at load: a file that exists as a [`PasswordFile`] or [`AclFile`]
//! has no bad line. Problems are reported per line ([`LineError`], `line 3: ...`), every one of
//! them, and never quote a password or a hash. Checking a password against a hash, and deciding
//! what an ACL allows, is the broker's business (`outpost-protocols`); this module only knows
//! the formats.
//!
//! # Password file
//!
//! One `user:hash` per line; blank lines and lines starting with `#` are skipped. `hash` is
//! - `$7$<iterations>$<base64 salt>$<base64 hash>`: PBKDF2-HMAC-SHA512 with a 64-byte hash,
//!   what `mosquitto_passwd` writes by default since mosquitto 2.0;
//! - `$6$<base64 salt>$<base64 hash>`: SHA-512(password ‖ salt), mosquitto 1.x's format
//!   (`mosquitto_passwd -H sha512`).
//!
//! Stricter than mosquitto, which skips what it cannot read: a plain-text password, an unknown
//! hash type, an empty or repeated user name are errors, so a typo never locks a device out
//! silently.
//!
//! # ACL file
//!
//! ```text
//! # comment
//! topic read sensors/#          lines before any `user` line: clients without a username
//! user alice                    from here to the next `user` line: rules for alice
//! topic readwrite alice/#
//! pattern write devices/%c/#    any position: every client; %c = client id, %u = username
//! ```
//!
//! The access word is `read` (subscribe and receive), `write` (publish), `readwrite` (both, the
//! default when the word is left out) or `deny` (neither, and it wins over a grant in the same
//! group). The rest of the line is the topic filter (it may contain spaces). A line whose first
//! word after `topic`/`pattern` is an access word needs a filter after it, as in mosquitto.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use thiserror::Error;

use crate::types::TopicFilter;

/// Standard base64; padding optional, as mosquitto's encoder pads but hand-edited files may not.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Length of a SHA-512 digest, the hash length of both formats.
pub const PASSWORD_HASH_LEN: usize = 64;

/// One problem on one line of an access file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {message}")]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong. Never contains a password, salt or hash.
    pub message: String,
}

/// Why an access file could not be loaded.
#[derive(Debug, Error)]
pub enum AuthFileError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was read and has bad lines (all of them, in file order).
    #[error("{}: {}", path.display(), join(errors))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every bad line.
        errors: Vec<LineError>,
    },
}

fn join(errors: &[LineError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn read(path: &Path) -> Result<String, AuthFileError> {
    std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
        path: path.to_owned(),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// Password file

/// A stored password hash. `Debug` shows the scheme and iterations, never salt or hash.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordHash {
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        /// PBKDF2 iteration count (mosquitto_passwd 2.0 writes 101).
        iterations: NonZeroU32,
        /// The salt bytes (base64-decoded).
        salt: Vec<u8>,
        /// The derived key, [`PASSWORD_HASH_LEN`] bytes.
        hash: Vec<u8>,
    },
    /// `$6$`: SHA-512 over the password followed by the salt.
    Sha512 {
        /// The salt bytes (base64-decoded).
        salt: Vec<u8>,
        /// The digest, [`PASSWORD_HASH_LEN`] bytes.
        hash: Vec<u8>,
    },
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pbkdf2Sha512 { iterations, .. } => f
                .debug_struct("Pbkdf2Sha512")
                .field("iterations", iterations)
                .field("salt", &"***")
                .field("hash", &"***")
                .finish(),
            Self::Sha512 { .. } => f
                .debug_struct("Sha512")
                .field("salt", &"***")
                .field("hash", &"***")
                .finish(),
        }
    }
}

/// A parsed mosquitto password file: user name -> hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordFile {
    /// Where it was read from (reloads read it again).
    path: PathBuf,
    users: BTreeMap<String, PasswordHash>,
}

impl PasswordFile {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let text = read(path)?;
        Self::parse(path, &text).map_err(|errors| AuthFileError::Invalid {
            path: path.to_owned(),
            errors,
        })
    }

    /// Parses `text` as the contents of `path`; every bad line is reported.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Vec<LineError>> {
        let mut users = BTreeMap::new();
        let mut first_line: BTreeMap<String, usize> = BTreeMap::new();
        let mut errors = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let mut err = |message: String| errors.push(LineError { line, message });
            let Some((user, hash)) = content.split_once(':') else {
                err("expected user:hash".into());
                continue;
            };
            let user = user.trim();
            if user.is_empty() {
                err("empty user name".into());
                continue;
            }
            if user.len() > crate::MQTT_MAX_STRING_BYTES {
                err("user name longer than 65535 bytes".into());
                continue;
            }
            if let Some(first) = first_line.get(user) {
                err(format!("user {user:?} already defined on line {first}"));
                continue;
            }
            match parse_hash(hash.trim()) {
                Ok(h) => {
                    first_line.insert(user.to_owned(), line);
                    users.insert(user.to_owned(), h);
                }
                Err(message) => err(format!("user {user:?}: {message}")),
            }
        }
        if errors.is_empty() {
            Ok(Self {
                path: path.to_owned(),
                users,
            })
        } else {
            Err(errors)
        }
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The hash stored for `user`.
    pub fn get(&self, user: &str) -> Option<&PasswordHash> {
        self.users.get(user)
    }

    /// The user names, sorted.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file defines no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Parses the part after `user:`. Messages never quote the field: it may be a plain password.
fn parse_hash(field: &str) -> Result<PasswordHash, String> {
    let Some(rest) = field.strip_prefix('$') else {
        return Err(
            "the password is not hashed; hash the file with `mosquitto_passwd -U FILE`".into(),
        );
    };
    let parts: Vec<&str> = rest.split('$').collect();
    let decode = |what: &str, text: &str| -> Result<Vec<u8>, String> {
        let bytes = B64
            .decode(text)
            .map_err(|_| format!("the {what} is not valid base64"))?;
        if bytes.is_empty() {
            return Err(format!("the {what} is empty"));
        }
        Ok(bytes)
    };
    let hash_of = |text: &str| -> Result<Vec<u8>, String> {
        let hash = decode("hash", text)?;
        if hash.len() != PASSWORD_HASH_LEN {
            return Err(format!(
                "the hash is {} bytes; SHA-512 gives {PASSWORD_HASH_LEN}",
                hash.len()
            ));
        }
        Ok(hash)
    };
    match parts.as_slice() {
        ["7", iterations, salt, hash] => {
            let iterations = iterations
                .parse::<NonZeroU32>()
                .map_err(|_| "the iteration count is not a positive integer".to_owned())?;
            Ok(PasswordHash::Pbkdf2Sha512 {
                iterations,
                salt: decode("salt", salt)?,
                hash: hash_of(hash)?,
            })
        }
        ["7", ..] => Err("expected $7$<iterations>$<salt>$<hash>".into()),
        ["6", salt, hash] => Ok(PasswordHash::Sha512 {
            salt: decode("salt", salt)?,
            hash: hash_of(hash)?,
        }),
        ["6", ..] => Err("expected $6$<salt>$<hash>".into()),
        [kind, ..]
            if !kind.is_empty()
                && kind.len() <= 4
                && kind.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            Err(format!(
                "unsupported hash type ${kind}$; expected $7$ (PBKDF2-SHA512) or $6$ (SHA-512)"
            ))
        }
        _ => Err("unsupported hash; expected $7$ (PBKDF2-SHA512) or $6$ (SHA-512)".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// ACL file

/// What an ACL rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AclAccess {
    /// Subscribe to and receive messages on matching topics.
    Read,
    /// Publish to matching topics.
    Write,
    /// Both.
    ReadWrite,
    /// Neither; overrides grants of the same group (user or anonymous rules, or patterns).
    Deny,
}

impl AclAccess {
    /// Whether the rule grants reading (receiving, subscribing).
    pub fn reads(self) -> bool {
        matches!(self, Self::Read | Self::ReadWrite)
    }

    /// Whether the rule grants writing (publishing).
    pub fn writes(self) -> bool {
        matches!(self, Self::Write | Self::ReadWrite)
    }

    /// The ACL file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::ReadWrite => "readwrite",
            Self::Deny => "deny",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "read" => Self::Read,
            "write" => Self::Write,
            "readwrite" => Self::ReadWrite,
            "deny" => Self::Deny,
            _ => return None,
        })
    }
}

/// One `topic` or `pattern` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRule {
    /// What it grants.
    pub access: AclAccess,
    /// The filter; in a pattern it may hold `%c` and `%u`, substituted per client.
    pub filter: TopicFilter,
    /// Where it is in the file, for logs.
    pub line: usize,
}

/// A parsed mosquitto ACL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclFile {
    path: PathBuf,
    anonymous: Vec<AclRule>,
    users: BTreeMap<String, Vec<AclRule>>,
    patterns: Vec<AclRule>,
}

impl AclFile {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let text = read(path)?;
        Self::parse(path, &text).map_err(|errors| AuthFileError::Invalid {
            path: path.to_owned(),
            errors,
        })
    }

    /// Parses `text` as the contents of `path`; every bad line is reported.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Vec<LineError>> {
        let mut acl = Self {
            path: path.to_owned(),
            anonymous: Vec::new(),
            users: BTreeMap::new(),
            patterns: Vec::new(),
        };
        let mut errors = Vec::new();
        // The `user` section being read; `None` before the first (anonymous clients' rules).
        let mut current: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let (keyword, rest) = split_word(content);
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        errors.push(LineError {
                            line,
                            message: "`user` needs a user name".into(),
                        });
                        // Rules up to the next `user` line must not land in another section.
                        current = Some(String::new());
                    } else {
                        acl.users.entry(rest.to_owned()).or_default();
                        current = Some(rest.to_owned());
                    }
                }
                "topic" | "pattern" => match parse_rule(keyword, rest, line) {
                    Ok(rule) if keyword == "pattern" => acl.patterns.push(rule),
                    Ok(rule) => match &current {
                        None => acl.anonymous.push(rule),
                        Some(user) if user.is_empty() => {}
                        Some(user) => acl.users.entry(user.clone()).or_default().push(rule),
                    },
                    Err(message) => errors.push(LineError { line, message }),
                },
                other => errors.push(LineError {
                    line,
                    message: format!("unknown keyword {other:?}; expected user, topic or pattern"),
                }),
            }
        }
        acl.users.remove("");
        if errors.is_empty() {
            Ok(acl)
        } else {
            Err(errors)
        }
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `topic` rules before the first `user` line: they apply to clients without a username.
    pub fn anonymous_rules(&self) -> &[AclRule] {
        &self.anonymous
    }

    /// The `topic` rules of `user`'s section(s); `None` if the file has no section for it.
    pub fn user_rules(&self, user: &str) -> Option<&[AclRule]> {
        self.users.get(user).map(Vec::as_slice)
    }

    /// The user names with a section, sorted.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// `pattern` rules, for every client, in file order.
    pub fn patterns(&self) -> &[AclRule] {
        &self.patterns
    }
}

/// The first whitespace-delimited word and the trimmed rest.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (s, ""),
    }
}

fn parse_rule(keyword: &str, rest: &str, line: usize) -> Result<AclRule, String> {
    let (first, after) = split_word(rest);
    let (access, filter) = match AclAccess::parse(first) {
        Some(access) => (access, after),
        None => (AclAccess::ReadWrite, rest),
    };
    if filter.is_empty() {
        return Err(format!("`{keyword}` needs a topic filter"));
    }
    let filter = TopicFilter::new(filter).map_err(|e| format!("{e}"))?;
    Ok(AclRule {
        access,
        filter,
        line,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Generated here by `mosquitto_passwd -b FILE alice secret` (mosquitto 2.0.11).
    const ALICE_PBKDF2: &str = "alice:$7$101$OGHa2DYnj9xUSOMu$VTsrTPra1zIlZKNn+f7lTNk6fOXrI2/zkYLtqxOuG7JyQMCZWUHM4zTixl8csq0sqDq0tXHqBBFWnV4v9LjT2w==";
    /// Generated here by `mosquitto_passwd -H sha512 -b FILE carol legacy`.
    const CAROL_SHA512: &str = "carol:$6$0HOvr5dtfqVyFVOB$aTMi2HLLar4hAGiRlFLfCcdCZiC6f2wCQ6vOhCbIrOccSM5ei9o3Ur6qUQY8C0OrDJzuBkRM8JpyWyDkW3Bfew==";

    fn pw(text: &str) -> Result<PasswordFile, Vec<LineError>> {
        PasswordFile::parse(Path::new("passwd"), text)
    }

    fn acl(text: &str) -> Result<AclFile, Vec<LineError>> {
        AclFile::parse(Path::new("acl"), text)
    }

    fn lines(errors: &[LineError]) -> Vec<usize> {
        errors.iter().map(|e| e.line).collect()
    }

    #[test]
    fn password_file_both_formats_comments_and_blanks() {
        let text = format!("# users\n\n{ALICE_PBKDF2}\n  \n{CAROL_SHA512}\n");
        let f = pw(&text).unwrap();
        assert_eq!(f.users().collect::<Vec<_>>(), ["alice", "carol"]);
        match f.get("alice").unwrap() {
            PasswordHash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                assert_eq!(iterations.get(), 101);
                assert_eq!(salt.len(), 12);
                assert_eq!(hash.len(), 64);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            f.get("carol").unwrap(),
            PasswordHash::Sha512 { .. }
        ));
        assert_eq!(f.path(), Path::new("passwd"));
        assert_eq!(pw("").unwrap().len(), 0);
    }

    #[test]
    fn password_hash_debug_hides_salt_and_hash() {
        let f = pw(ALICE_PBKDF2).unwrap();
        let printed = format!("{f:?}");
        assert!(
            printed.contains("***") && printed.contains("101"),
            "{printed}"
        );
        assert!(
            !printed.contains("OGHa") && !printed.contains("VTsr"),
            "{printed}"
        );
        assert!(!printed.contains("56, 97"), "no salt bytes: {printed}");
    }

    #[test]
    fn password_file_errors_name_every_bad_line_and_never_the_secret() {
        let text = [
            ALICE_PBKDF2,                        // 1 ok
            "bob:plaintext-secret",              // 2 not hashed
            "no colon here",                     // 3
            ":$6$AAAA$AAAA",                     // 4 empty user
            "dave:$7$0$OGHa2DYnj9xUSOMu$AAAA",   // 5 zero iterations
            "erin:$7$101$!!!$AAAA",              // 6 bad base64 salt
            "fred:$7$101$OGHa2DYnj9xUSOMu$AAAA", // 7 short hash
            "gina:$5$abc$def",                   // 8 unsupported
            "hank:$7$101$OGHa",                  // 9 missing field
            ALICE_PBKDF2,                        // 10 duplicate
        ]
        .join("\n");
        let errs = pw(&text).unwrap_err();
        assert_eq!(lines(&errs), [2, 3, 4, 5, 6, 7, 8, 9, 10], "{errs:#?}");
        let all = errs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(!all.contains("plaintext-secret"), "{all}");
        assert!(!all.contains("OGHa"), "{all}");
        assert!(
            all.contains("line 2: user \"bob\": the password is not hashed"),
            "{all}"
        );
        assert!(
            all.contains("line 5: user \"dave\": the iteration count"),
            "{all}"
        );
        assert!(
            all.contains("line 7: user \"fred\": the hash is 3 bytes"),
            "{all}"
        );
        assert!(all.contains("unsupported hash type $5$"), "{all}");
        assert!(
            all.contains("line 10: user \"alice\" already defined on line 1"),
            "{all}"
        );
    }

    #[test]
    fn acl_every_syntax_form() {
        let text = "\
# anonymous clients
topic read public/#
topic public/chat
  # indented comment

user alice
topic write alice/out
topic readwrite alice/#
topic deny alice/secret
topic read a topic with spaces
pattern read devices/%c/cmd
user bob smith
topic bob/#
user alice
topic read extra/#
pattern devices/%u/#
";
        let a = acl(text).unwrap();
        let show = |rules: &[AclRule]| -> Vec<(AclAccess, String, usize)> {
            rules
                .iter()
                .map(|r| (r.access, r.filter.as_str().to_owned(), r.line))
                .collect()
        };
        use AclAccess::*;
        assert_eq!(
            show(a.anonymous_rules()),
            [
                (Read, "public/#".to_owned(), 2),
                (ReadWrite, "public/chat".to_owned(), 3)
            ]
        );
        assert_eq!(
            show(a.user_rules("alice").unwrap()),
            [
                (Write, "alice/out".to_owned(), 7),
                (ReadWrite, "alice/#".to_owned(), 8),
                (Deny, "alice/secret".to_owned(), 9),
                (Read, "a topic with spaces".to_owned(), 10),
                (Read, "extra/#".to_owned(), 15),
            ]
        );
        assert_eq!(
            show(a.user_rules("bob smith").unwrap()),
            [(ReadWrite, "bob/#".to_owned(), 13)]
        );
        assert_eq!(a.user_rules("carol"), None);
        assert_eq!(
            show(a.patterns()),
            [
                (Read, "devices/%c/cmd".to_owned(), 11),
                (ReadWrite, "devices/%u/#".to_owned(), 16)
            ]
        );
        assert_eq!(a.users().collect::<Vec<_>>(), ["alice", "bob smith"]);
        assert!(Read.reads() && !Read.writes() && Write.writes() && !Deny.reads());
        assert!(ReadWrite.reads() && ReadWrite.writes());
    }

    #[test]
    fn acl_errors_name_every_bad_line() {
        let text = "\
topic read
user
topic x/#
pattern deny
topic read a/#/b
bogus line
topic write ok/+
pattern a+/b
";
        let errs = acl(text).unwrap_err();
        assert_eq!(lines(&errs), [1, 2, 4, 5, 6, 8], "{errs:#?}");
        assert!(errs[0].message.contains("needs a topic filter"));
        assert!(errs[1].message.contains("needs a user name"));
        assert!(errs[3].message.contains("last level"), "{errs:?}");
        assert!(errs[4].message.contains("unknown keyword \"bogus\""));
        assert_eq!(errs[0].to_string(), "line 1: `topic` needs a topic filter");
    }

    #[test]
    fn acl_rules_after_a_nameless_user_line_go_nowhere() {
        // Line 2 is an error; its rules must not be given to anonymous clients meanwhile.
        let errs = acl("topic a\nuser\ntopic b\n").unwrap_err();
        assert_eq!(lines(&errs), [2]);
    }

    #[test]
    fn load_reports_missing_files_and_bad_lines_with_the_path() {
        let dir = std::env::temp_dir().join(format!("outpost-auth-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing");
        let e = PasswordFile::load(&missing).unwrap_err();
        assert!(matches!(e, AuthFileError::Read { .. }));
        assert!(e.to_string().starts_with("cannot read "), "{e}");
        let bad = dir.join("acl");
        std::fs::write(&bad, "topic read a\nnope\n").unwrap();
        let e = AclFile::load(&bad).unwrap_err();
        assert!(
            e.to_string().ends_with(
                "acl: line 2: unknown keyword \"nope\"; expected user, topic or pattern"
            ),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
