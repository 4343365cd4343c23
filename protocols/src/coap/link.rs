//! `/.well-known/core` in CoRE Link Format (RFC 6690), written by hand: coap-lite's link-format
//! writer emits `obs=` for a value-less attribute, and `;obs` is what clients look for.

/// One link: target and attributes. An attribute without a value (`obs`) has `None`.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub href: String,
    pub attrs: Vec<(&'static str, Option<String>)>,
}

impl Link {
    fn render(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.href);
        out.push('>');
        for (name, value) in &self.attrs {
            out.push(';');
            out.push_str(name);
            if let Some(v) = value {
                out.push('=');
                // Numbers bare (ct=50), everything else quoted.
                if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
                    out.push_str(v);
                } else {
                    out.push('"');
                    out.push_str(v);
                    out.push('"');
                }
            }
        }
    }

    /// RFC 6690 section 4.1 query filtering: `name=value`, value may end in `*` (prefix match);
    /// space-separated attribute values (rt, if, ct) match if any token does; `href` matches the
    /// target. A filter without `=` matches if the attribute is present.
    fn matches(&self, query: &str) -> bool {
        let (name, pattern) = match query.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (query, None),
        };
        let hit = |candidate: &str| match pattern {
            None => true,
            Some(p) => match p.strip_suffix('*') {
                Some(prefix) => candidate.starts_with(prefix),
                None => candidate == p,
            },
        };
        if name == "href" {
            return hit(&self.href);
        }
        self.attrs
            .iter()
            .filter(|(n, _)| *n == name)
            .any(|(_, v)| match v {
                None => pattern.is_none(),
                Some(v) => v.split_ascii_whitespace().any(hit) || hit(v),
            })
    }
}

/// The link-format document for `links`, keeping those that match every query argument.
pub(crate) fn document(links: &[Link], queries: &[String]) -> String {
    let mut out = String::new();
    for link in links
        .iter()
        .filter(|l| queries.iter().all(|q| l.matches(q)))
    {
        if !out.is_empty() {
            out.push(',');
        }
        link.render(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Vec<Link> {
        vec![
            Link {
                href: "/t".into(),
                attrs: vec![
                    ("rt", Some("outpost.ingest".into())),
                    ("ct", Some("0 50 60 110 112".into())),
                    ("if", Some("core.p".into())),
                ],
            },
            Link {
                href: "/status".into(),
                attrs: vec![
                    ("rt", Some("outpost.status".into())),
                    ("ct", Some("50".into())),
                    ("obs", None),
                ],
            },
        ]
    }

    #[test]
    fn renders_obs_without_value() {
        assert_eq!(
            document(&links(), &[]),
            r#"</t>;rt="outpost.ingest";ct="0 50 60 110 112";if="core.p",</status>;rt="outpost.status";ct=50;obs"#
        );
    }

    #[test]
    fn filters() {
        let q = |s: &str| document(&links(), &[s.to_owned()]);
        assert!(q("rt=outpost.status").starts_with("</status>"));
        assert!(q("rt=outpost.*").contains("</t>") && q("rt=outpost.*").contains("</status>"));
        assert_eq!(q("rt=other"), "");
        assert!(q("ct=112").starts_with("</t>"));
        assert!(q("ct=50").contains("</t>") && q("ct=50").contains("</status>"));
        assert!(q("href=/st*").starts_with("</status>"));
        assert!(q("if=core.p").starts_with("</t>"));
        assert!(q("obs").starts_with("</status>"));
    }
}
