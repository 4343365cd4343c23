//! A parser for CoRE Link Format (RFC 6690 section 2), the body of a `/.well-known/core` answer.
//!
//! coap-lite has a link-format reader, but it takes `;obs` and `;obs=""` apart differently from
//! what devices send and stops at the first error without saying where; this one is small,
//! total (never panics, any input) and reports the byte offset of the first error. It accepts
//! what devices really send: whitespace around separators, quoted values containing `,` and
//! `;`, bare tokens (`ct=50`), value-less attributes (`obs`), repeated attributes.

use std::collections::BTreeMap;

use super::Resource;

/// Longest link target or attribute value kept, in bytes; longer is an error.
const MAX_FIELD: usize = 1024;

/// Attributes kept per link; more is an error (a device does not need more).
const MAX_ATTRS: usize = 32;

/// Why a document could not be read, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed link-format at byte {offset}: {what}")]
pub struct LinkFormatError {
    /// Byte offset into the document.
    pub offset: usize,
    /// What was expected or wrong.
    pub what: &'static str,
}

struct Cursor<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.pos += 1;
        }
    }

    fn err(&self, what: &'static str) -> LinkFormatError {
        LinkFormatError {
            offset: self.pos,
            what,
        }
    }

    /// Bytes while `keep` holds, as UTF-8 (the input is a `&str`, and every stop byte is ASCII,
    /// so the slice boundaries are character boundaries).
    fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> String {
        let start = self.pos;
        while self.peek().is_some_and(&keep) {
            self.pos += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.pos]).into_owned()
    }

    /// A quoted-string (RFC 2616 / 8288): `"..."` with `\` escaping the next byte.
    fn quoted(&mut self) -> Result<String, LinkFormatError> {
        self.pos += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated quoted string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(b) => out.push(b),
                        None => return Err(self.err("unterminated quoted string")),
                    }
                    self.pos += 1;
                }
                Some(b) => {
                    out.push(b);
                    self.pos += 1;
                }
            }
            if out.len() > MAX_FIELD {
                return Err(self.err("attribute value too long"));
            }
        }
    }
}

fn is_parmname(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~*".contains(&b)
}

fn is_ptoken(b: u8) -> bool {
    !matches!(b, b',' | b';' | b'"' | b' ' | b'\t' | b'\r' | b'\n') && !b.is_ascii_control()
}

/// Parses a link-format document. An empty document (or only whitespace) is no links.
pub fn parse_link_format(doc: &str) -> Result<Vec<Resource>, LinkFormatError> {
    let mut c = Cursor {
        s: doc.as_bytes(),
        pos: 0,
    };
    let mut links = Vec::new();
    c.skip_ws();
    if c.peek().is_none() {
        return Ok(links);
    }
    loop {
        c.skip_ws();
        if c.peek() != Some(b'<') {
            return Err(c.err("expected '<'"));
        }
        c.pos += 1;
        let path = c.take_while(|b| b != b'>');
        if c.peek() != Some(b'>') {
            return Err(c.err("unterminated link target"));
        }
        c.pos += 1;
        if path.is_empty() || path.len() > MAX_FIELD {
            return Err(c.err("empty or over-long link target"));
        }
        let mut attrs: BTreeMap<String, String> = BTreeMap::new();
        loop {
            c.skip_ws();
            match c.peek() {
                Some(b';') => c.pos += 1,
                Some(b',') | None => break,
                Some(_) => return Err(c.err("expected ';' or ','")),
            }
            c.skip_ws();
            let name = c.take_while(is_parmname);
            if name.is_empty() || name.len() > MAX_FIELD {
                return Err(c.err("expected an attribute name"));
            }
            c.skip_ws();
            let value = if c.peek() == Some(b'=') {
                c.pos += 1;
                c.skip_ws();
                if c.peek() == Some(b'"') {
                    c.quoted()?
                } else {
                    let v = c.take_while(is_ptoken);
                    if v.len() > MAX_FIELD {
                        return Err(c.err("attribute value too long"));
                    }
                    v
                }
            } else {
                String::new()
            };
            match attrs.get_mut(&name) {
                Some(prev) if !value.is_empty() => {
                    if !prev.is_empty() {
                        prev.push(' ');
                    }
                    prev.push_str(&value);
                }
                Some(_) => {}
                None => {
                    if attrs.len() == MAX_ATTRS {
                        return Err(c.err("too many attributes"));
                    }
                    attrs.insert(name, value);
                }
            }
            if attrs.values().map(String::len).sum::<usize>() > 4 * MAX_FIELD {
                return Err(c.err("attributes too long"));
            }
        }
        let observable = attrs.contains_key("obs");
        links.push(Resource {
            path,
            attrs,
            observable,
        });
        if c.peek().is_none() {
            return Ok(links);
        }
        c.pos += 1; // the ','
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_what_devices_send() {
        let doc = r#"</t>;rt="outpost.ingest";ct="0 50 60 110 112";if="core.p",</status>;rt="outpost.status";ct=50;obs"#;
        let links = parse_link_format(doc).unwrap();
        assert_eq!(links.len(), 2);
        assert_eq!(links[0].path, "/t");
        assert_eq!(links[0].attrs["ct"], "0 50 60 110 112");
        assert!(!links[0].observable);
        assert_eq!(links[1].path, "/status");
        assert_eq!(links[1].attrs["ct"], "50");
        assert!(links[1].observable);
        assert_eq!(links[1].attrs["obs"], "");
    }

    #[test]
    fn tolerates_whitespace_quotes_and_repeats() {
        let doc = "\n <a> ; title=\"x, y; \\\"z\\\"\" ; rt=one ;rt=\"two\",\r\n<b>";
        let links = parse_link_format(doc).unwrap();
        assert_eq!(links.len(), 2);
        assert_eq!(links[0].attrs["title"], "x, y; \"z\"");
        assert_eq!(links[0].attrs["rt"], "one two");
        assert_eq!(links[1].path, "b");
        assert!(parse_link_format("").unwrap().is_empty());
        assert!(parse_link_format("  \n").unwrap().is_empty());
    }

    #[test]
    fn rejects_malformed_documents_with_an_offset() {
        for bad in [
            "/a",
            "<a",
            "<a>;",
            "<a>;=x",
            "<a>;rt=\"open",
            "<a> x",
            "<a>,",
            "<>",
            "<a>;rt=\"\\",
        ] {
            let e = parse_link_format(bad).unwrap_err();
            assert!(e.offset <= bad.len(), "{bad}: {e}");
        }
        let long = format!("<{}>", "a".repeat(2000));
        assert!(parse_link_format(&long).is_err());
        let many: String = (0..40).map(|i| format!(";a{i}")).collect();
        assert!(parse_link_format(&format!("<a>{many}")).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(doc in ".{0,300}") {
            let _ = parse_link_format(&doc);
        }

        #[test]
        fn never_panics_on_link_like_input(doc in "[<>;,=\" a-z\\\\]{0,200}") {
            let _ = parse_link_format(&doc);
        }
    }
}
