//! Resource discovery (RFC 6690): GET /.well-known/core, read by libcoap's client and parsed by
//! hand, and by aiocoap's link-format parser, lists the ingest resource `</t>`
//! (rt="outpost.ingest", with the content formats it takes) and the observable `</status>`
//! (`obs`); `?rt=outpost.ingest` filters the document down to `</t>`.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_tests::{TestDir, coap_client_notls, coap_gateway_config, coap_py, start_coap_gateway};

type Links = BTreeMap<String, BTreeMap<String, Vec<Option<String>>>>;

/// A small RFC 6690 parser: `<href>;name=value;name="quoted value";flag,<href>...`.
fn parse_link_format(doc: &str) -> anyhow::Result<Links> {
    let mut out = Links::new();
    let mut rest = doc.trim();
    while !rest.is_empty() {
        let r = rest
            .strip_prefix('<')
            .ok_or_else(|| anyhow::anyhow!("link does not start with '<': {rest:?}"))?;
        let (href, mut r) = r
            .split_once('>')
            .ok_or_else(|| anyhow::anyhow!("unterminated target in {doc:?}"))?;
        let attrs = out.entry(href.to_owned()).or_default();
        while let Some(a) = r.strip_prefix(';') {
            let name_end = a.find(['=', ';', ',']).unwrap_or(a.len());
            let name = a[..name_end].to_owned();
            r = &a[name_end..];
            if let Some(v) = r.strip_prefix('=') {
                if let Some(q) = v.strip_prefix('"') {
                    let end = q
                        .find('"')
                        .ok_or_else(|| anyhow::anyhow!("unterminated quote in {doc:?}"))?;
                    attrs
                        .entry(name)
                        .or_default()
                        .push(Some(q[..end].to_owned()));
                    r = &q[end + 1..];
                } else {
                    let end = v.find([';', ',']).unwrap_or(v.len());
                    attrs
                        .entry(name)
                        .or_default()
                        .push(Some(v[..end].to_owned()));
                    r = &v[end..];
                }
            } else {
                attrs.entry(name).or_default().push(None);
            }
        }
        rest = r.strip_prefix(',').unwrap_or(r).trim_start();
        if !r.is_empty() && !r.starts_with(',') {
            anyhow::bail!("garbage after a link: {r:?}");
        }
    }
    Ok(out)
}

fn attr<'a>(links: &'a Links, href: &str, name: &str) -> Option<&'a Vec<Option<String>>> {
    links.get(href)?.get(name)
}

/// The checks both clients' views must pass.
fn check_full(links: &Links, who: &str) {
    assert!(
        links.contains_key("/t"),
        "{who}: the ingest resource </t> is listed: {links:?}"
    );
    assert!(
        links.contains_key("/status"),
        "{who}: </status> is listed: {links:?}"
    );
    assert_eq!(
        attr(links, "/t", "rt"),
        Some(&vec![Some("outpost.ingest".to_owned())]),
        "{who}: </t> has rt=\"outpost.ingest\": {links:?}"
    );
    let ct = attr(links, "/t", "ct")
        .and_then(|v| v.first().cloned().flatten())
        .unwrap_or_default();
    for f in ["0", "50", "60", "110", "112"] {
        assert!(
            ct.split_whitespace().any(|c| c == f),
            "{who}: </t> advertises content format {f} in ct={ct:?}"
        );
    }
    assert_eq!(
        attr(links, "/status", "obs"),
        Some(&vec![None]),
        "{who}: </status> is marked observable with a bare `obs`: {links:?}"
    );
    assert!(
        attr(links, "/t", "obs").is_none(),
        "{who}: </t> is not observable: {links:?}"
    );
}

#[test]
fn coap_well_known_core_lists_ingest_and_observable_status() -> anyhow::Result<()> {
    let dir = TestDir::new("coap-wkc")?;
    let (cfg, coap) = coap_gateway_config(&dir, "gw1", None)?;
    let _gw = start_coap_gateway(&dir, &cfg, coap)?;
    let base = format!("coap://127.0.0.1:{coap}/.well-known/core");

    // libcoap: code and Content-Format from the log, the document parsed here.
    let r = coap_client_notls(&["-m", "get", &base], Duration::from_secs(30))?;
    assert_eq!(r.code.as_deref(), Some("2.05"), "{}", r.output);
    assert!(
        r.output.contains("Content-Format:application/link-format"),
        "served as application/link-format (40):\n{}",
        r.output
    );
    let doc = r.payload.clone().unwrap_or_default();
    let links = parse_link_format(&doc)?;
    check_full(&links, "coap-client-notls");

    // aiocoap: its own link-format parser.
    let (rc, lines) = coap_py(
        &dir,
        "aiocoap-wkc",
        &["links", "--uri", &base],
        Duration::from_secs(30),
    )?;
    assert_eq!(rc, 0, "aiocoap GET /.well-known/core: {lines:?}");
    let j = &lines[0];
    assert_eq!(j["code"], "2.05", "{j}");
    assert_eq!(j["content_format"], 40, "link-format: {j}");
    let mut from_aiocoap = Links::new();
    for l in j["links"].as_array().cloned().unwrap_or_default() {
        let href = l["href"].as_str().unwrap_or_default().to_owned();
        let mut attrs = BTreeMap::new();
        for (k, vs) in l["attrs"].as_object().cloned().unwrap_or_default() {
            let vals: Vec<Option<String>> = vs
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect();
            attrs.insert(k, vals);
        }
        from_aiocoap.insert(href, attrs);
    }
    check_full(&from_aiocoap, "aiocoap");
    assert_eq!(
        from_aiocoap, links,
        "aiocoap's parser and ours read the same document"
    );

    // ?rt= filtering, with both clients.
    let filtered = format!("{base}?rt=outpost.ingest");
    let r = coap_client_notls(&["-m", "get", &filtered], Duration::from_secs(30))?;
    assert_eq!(r.code.as_deref(), Some("2.05"), "{}", r.output);
    let links = parse_link_format(&r.payload.clone().unwrap_or_default())?;
    assert_eq!(
        links.keys().collect::<Vec<_>>(),
        vec!["/t"],
        "?rt=outpost.ingest keeps only </t>:\n{}",
        r.output
    );
    let (rc, lines) = coap_py(
        &dir,
        "aiocoap-wkc-rt",
        &["links", "--uri", &filtered],
        Duration::from_secs(30),
    )?;
    assert_eq!(rc, 0, "{lines:?}");
    let hrefs: Vec<&str> = lines[0]["links"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l["href"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        hrefs,
        vec!["/t"],
        "aiocoap: ?rt=outpost.ingest keeps only </t>"
    );

    // A filter nothing matches: an empty document, still 2.05.
    let r = coap_client_notls(
        &["-m", "get", &format!("{base}?rt=no.such.type")],
        Duration::from_secs(30),
    )?;
    assert_eq!(r.code.as_deref(), Some("2.05"), "{}", r.output);
    assert!(
        parse_link_format(&r.payload.clone().unwrap_or_default())?.is_empty(),
        "no link matches ?rt=no.such.type:\n{}",
        r.output
    );
    Ok(())
}
