//! SenML decode throughput (issue 4, "Measure"): MB/s of
//! `outpost_protocols::payload::validate(ContentFormat::SenmlCbor, bytes, now)` on a small
//! (100 B, one record) and a large (about 64 KiB, 500 records) pack, against, in the same
//! process and the same run:
//! - `validate(ContentFormat::SenmlJson, ..)` on the same pack written as SenML JSON (Outpost's
//!   full decode and resolution of the JSON form),
//! - `serde_json::from_slice::<serde_json::Value>` on that JSON (a generic parse, no SenML
//!   resolution: what "just parse the JSON" costs),
//! - `validate(ContentFormat::Cbor, ..)` on the CBOR pack (well-formedness walk only).
//!
//! MB/s counts the input bytes of each format (10^6 bytes per second), so the JSON rows are
//! computed on the JSON size, which is larger for the same records; records/s is printed too,
//! and is the figure to compare across formats.
//!
//! Each case runs for `--seconds` (default 1) per repetition, `--reps` (default 5) repetitions
//! interleaved across cases, median reported. `--json` prints one JSON object instead of a table.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outpost_protocols::payload::{ContentFormat, Decoded, validate};

/// One SenML record as the generator writes it (both encodings are produced from this).
struct Rec {
    bn: Option<String>,
    bt: Option<f64>,
    bu: Option<&'static str>,
    n: String,
    u: Option<&'static str>,
    t: Option<f64>,
    v: f64,
}

// ---- a minimal CBOR writer (definite lengths only), enough for SenML packs

fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

fn int(out: &mut Vec<u8>, i: i64) {
    if i >= 0 {
        head(out, 0, i as u64);
    } else {
        head(out, 1, (-1 - i) as u64);
    }
}

fn text(out: &mut Vec<u8>, s: &str) {
    head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn f64_(out: &mut Vec<u8>, x: f64) {
    out.push(0xfb);
    out.extend_from_slice(&x.to_bits().to_be_bytes());
}

/// RFC 8428 section 6 labels: bn -2, bt -3, bu -4, n 0, u 1, v 2, t 6.
fn to_cbor(pack: &[Rec]) -> Vec<u8> {
    let mut out = Vec::new();
    head(&mut out, 4, pack.len() as u64);
    for r in pack {
        let fields = 2
            + usize::from(r.bn.is_some())
            + usize::from(r.bt.is_some())
            + usize::from(r.bu.is_some())
            + usize::from(r.u.is_some())
            + usize::from(r.t.is_some());
        head(&mut out, 5, fields as u64);
        if let Some(bn) = &r.bn {
            int(&mut out, -2);
            text(&mut out, bn);
        }
        if let Some(bt) = r.bt {
            int(&mut out, -3);
            f64_(&mut out, bt);
        }
        if let Some(bu) = r.bu {
            int(&mut out, -4);
            text(&mut out, bu);
        }
        int(&mut out, 0);
        text(&mut out, &r.n);
        if let Some(u) = r.u {
            int(&mut out, 1);
            text(&mut out, u);
        }
        if let Some(t) = r.t {
            int(&mut out, 6);
            f64_(&mut out, t);
        }
        int(&mut out, 2);
        f64_(&mut out, r.v);
    }
    out
}

fn to_json(pack: &[Rec]) -> Vec<u8> {
    let arr: Vec<serde_json::Value> = pack
        .iter()
        .map(|r| {
            let mut m = serde_json::Map::new();
            if let Some(bn) = &r.bn {
                m.insert("bn".into(), bn.clone().into());
            }
            if let Some(bt) = r.bt {
                m.insert("bt".into(), bt.into());
            }
            if let Some(bu) = r.bu {
                m.insert("bu".into(), bu.into());
            }
            m.insert("n".into(), r.n.clone().into());
            if let Some(u) = r.u {
                m.insert("u".into(), u.into());
            }
            if let Some(t) = r.t {
                m.insert("t".into(), t.into());
            }
            m.insert("v".into(), r.v.into());
            serde_json::Value::Object(m)
        })
        .collect();
    serde_json::to_vec(&serde_json::Value::Array(arr)).expect("JSON encoding")
}

/// One record, CBOR exactly `size` bytes: the base name is padded to fit (100 B by default, the
/// size of the CoAP and MQTT ingest benchmarks' readings).
fn small_pack(size: usize) -> Vec<Rec> {
    let mk = |pad: usize| {
        vec![Rec {
            bn: Some(format!("urn:dev:mac:0024befffe80{}:", "0".repeat(pad))),
            bt: Some(1.7e9 + 0.25),
            bu: None,
            n: "temperature".into(),
            u: Some("Cel"),
            t: None,
            v: 23.125,
        }]
    };
    let base = to_cbor(&mk(0)).len();
    assert!(base <= size, "small pack cannot be under {base} bytes");
    // A text length crossing 23 adds a length byte; search the padding that lands exactly.
    (0..=size)
        .map(mk)
        .find(|p| to_cbor(p).len() == size)
        .unwrap_or_else(|| mk(size - base))
}

/// `records` records of a 500-sensor dump: base name/time/unit on the first, then a name, a
/// relative time and a value each; names padded so the CBOR is close to `target` bytes.
fn large_pack(records: usize, target: usize) -> Vec<Rec> {
    let mk = |pad: usize| {
        (0..records)
            .map(|i| Rec {
                bn: (i == 0).then(|| "urn:dev:mac:0024befffe804ff1:".to_string()),
                bt: (i == 0).then_some(1.7e9),
                bu: (i == 0).then_some("Cel"),
                n: format!("line-a/cell-{:03}/zone-{}/temperature{}", i / 8, i % 8, "x".repeat(pad)),
                u: None,
                t: Some(-(i as f64) * 0.5),
                v: 20.0 + (i as f64) * 0.0625,
            })
            .collect::<Vec<_>>()
    };
    let base = to_cbor(&mk(0)).len();
    let pad = target.saturating_sub(base) / records;
    mk(pad)
}

#[derive(Clone, Copy)]
enum Op {
    Outpost(ContentFormat),
    SerdeValue,
}

struct Case {
    pack: &'static str,
    what: &'static str,
    op: Op,
    bytes: Vec<u8>,
    records: usize,
    runs: Vec<(f64, f64)>, // (MB/s, records/s)
}

fn run_once(op: Op, bytes: &[u8], now: SystemTime) -> usize {
    match op {
        Op::Outpost(f) => match validate(f, black_box(bytes), now) {
            Ok(Decoded::Senml(recs)) => black_box(recs).len(),
            Ok(_) => 1,
            Err(e) => panic!("the benchmark's own pack does not validate as {f}: {e}"),
        },
        Op::SerdeValue => {
            let v: serde_json::Value =
                serde_json::from_slice(black_box(bytes)).expect("valid JSON");
            black_box(v).as_array().map_or(1, Vec::len)
        }
    }
}

fn measure(c: &mut Case, seconds: f64, now: SystemTime) {
    // Calibrate a batch of about 10 ms so the clock is read rarely.
    let mut batch = 1usize;
    loop {
        let t = Instant::now();
        for _ in 0..batch {
            run_once(c.op, &c.bytes, now);
        }
        if t.elapsed() >= Duration::from_millis(10) || batch >= 1 << 24 {
            break;
        }
        batch *= 2;
    }
    let t0 = Instant::now();
    let mut iters = 0u64;
    while t0.elapsed().as_secs_f64() < seconds {
        for _ in 0..batch {
            run_once(c.op, &c.bytes, now);
        }
        iters += batch as u64;
    }
    let el = t0.elapsed().as_secs_f64();
    let mbs = iters as f64 * c.bytes.len() as f64 / el / 1e6;
    let rps = iters as f64 * c.records as f64 / el;
    c.runs.push((mbs, rps));
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

fn main() {
    let mut seconds = 1.0;
    let mut reps = 5usize;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().and_then(|s| s.parse().ok()).expect("--seconds N"),
            "--reps" => reps = args.next().and_then(|s| s.parse().ok()).expect("--reps N"),
            "--json" => json = true,
            _ => {
                eprintln!("usage: senml-decode-bench [--seconds 1] [--reps 5] [--json]");
                std::process::exit(2);
            }
        }
    }
    // Fixed "now": relative times resolve the same way every iteration.
    let now = UNIX_EPOCH + Duration::from_secs(1_764_000_000);
    let small = small_pack(100);
    let large = large_pack(500, 64 * 1024);
    let mut cases = Vec::new();
    for (name, pack) in [("small", &small), ("large", &large)] {
        let cbor = to_cbor(pack);
        let js = to_json(pack);
        let n = pack.len();
        // The packs must decode, to the same records, in both forms.
        let a = validate(ContentFormat::SenmlCbor, &cbor, now).expect("CBOR pack decodes");
        let b = validate(ContentFormat::SenmlJson, &js, now).expect("JSON pack decodes");
        assert_eq!(a, b, "the CBOR and JSON packs resolve to different records");
        let mk = |what, op, bytes: &Vec<u8>| Case {
            pack: name,
            what,
            op,
            bytes: bytes.clone(),
            records: n,
            runs: Vec::new(),
        };
        cases.push(mk("Outpost validate(SenmlCbor)", Op::Outpost(ContentFormat::SenmlCbor), &cbor));
        cases.push(mk("Outpost validate(Cbor), well-formedness only", Op::Outpost(ContentFormat::Cbor), &cbor));
        cases.push(mk("Outpost validate(SenmlJson), same records as JSON", Op::Outpost(ContentFormat::SenmlJson), &js));
        cases.push(mk("serde_json::from_slice::<Value>, same JSON", Op::SerdeValue, &js));
    }
    for _ in 0..reps {
        for c in cases.iter_mut() {
            measure(c, seconds, now);
        }
    }
    if json {
        let out: Vec<serde_json::Value> = cases
            .iter()
            .map(|c| {
                serde_json::json!({
                    "pack": c.pack, "what": c.what, "bytes": c.bytes.len(), "records": c.records,
                    "mb_per_s_median": median(c.runs.iter().map(|r| r.0).collect()),
                    "records_per_s_median": median(c.runs.iter().map(|r| r.1).collect()),
                    "mb_per_s_runs": c.runs.iter().map(|r| r.0).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::json!({"seconds": seconds, "reps": reps, "cases": out}));
    } else {
        println!("| pack | decoder | input bytes | MB/s | records/s |");
        println!("|---|---|---:|---:|---:|");
        for c in &cases {
            println!(
                "| {} ({} rec) | {} | {} | {:.1} | {:.0} |",
                c.pack,
                c.records,
                c.what,
                c.bytes.len(),
                median(c.runs.iter().map(|r| r.0).collect()),
                median(c.runs.iter().map(|r| r.1).collect())
            );
        }
    }
}
