//! SenML decoder tests. The packs are the examples of RFC 8428 section 5 (JSON) and the CBOR
//! encoding of section 6, transcribed by hand.
#![allow(clippy::unwrap_used, clippy::float_cmp)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::payload::{ContentFormat, Decoded, validate};

/// A fixed "now" so relative times are checkable.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

const NOW: f64 = 1_700_000_000.0;

fn json(s: &str) -> Result<Vec<SenmlRecord>, PayloadError> {
    decode_json(s.as_bytes(), now())
}

fn num(r: &SenmlRecord) -> Number {
    match r.value {
        Some(SenmlValue::Number(n)) => n,
        ref other => panic!("not a number: {other:?}"),
    }
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn rfc_single_datapoint() {
    let r = json(r#"[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]"#).unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].name, "urn:dev:ow:10e2073a01080063");
    assert_eq!(r[0].unit.as_deref(), Some("Cel"));
    assert_eq!(num(&r[0]), Number::Float(23.1));
    // No time at all means "now".
    assert_eq!(r[0].time, NOW);
}

const MULTIPLE_DATAPOINTS: &str = r#"[
  {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
  {"n":"current","u":"A","v":1.2}
]"#;

fn check_multiple_datapoints(r: &[SenmlRecord]) {
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].name, "urn:dev:ow:10e2073a01080063:voltage");
    assert_eq!(r[0].unit.as_deref(), Some("V"));
    assert_eq!(num(&r[0]), Number::Float(120.1));
    assert_eq!(r[1].name, "urn:dev:ow:10e2073a01080063:current");
    assert_eq!(r[1].unit.as_deref(), Some("A"));
    assert_eq!(num(&r[1]), Number::Float(1.2));
}

#[test]
fn rfc_multiple_datapoints() {
    check_multiple_datapoints(&json(MULTIPLE_DATAPOINTS).unwrap());
}

#[test]
fn rfc_cbor_example_matches_the_json_one() {
    // RFC 8428 section 6: the multiple-datapoints pack in CBOR.
    let bytes = hex("82 a4 21 78 1c 75 72 6e 3a 64 65 76 3a 6f 77 3a
         31 30 65 32 30 37 33 61 30 31 30 38 30 30 36 33
         3a 00 67 76 6f 6c 74 61 67 65 01 61 56 02 fb 40
         5e 06 66 66 66 66 66 a3 00 67 63 75 72 72 65 6e
         74 01 61 41 02 fb 3f f3 33 33 33 33 33 33");
    let r = decode_cbor(&bytes, now()).unwrap();
    check_multiple_datapoints(&r);
    assert_eq!(r, json(MULTIPLE_DATAPOINTS).unwrap());
    assert_eq!(
        validate(ContentFormat::SenmlCbor, &bytes, now()),
        Ok(Decoded::Senml(r))
    );
}

#[test]
fn rfc_multiple_measurements_resolve_base_time_and_unit() {
    let r = json(
        r#"[
  {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
   "bu":"A","bver":5,"n":"voltage","u":"V","v":120.1},
  {"n":"current","t":-5,"v":1.2},
  {"n":"current","t":-4,"v":1.3},
  {"n":"current","t":-3,"v":1.4},
  {"n":"current","t":-2,"v":1.5},
  {"n":"current","t":-1,"v":1.6},
  {"n":"current","v":1.7}
]"#,
    )
    .unwrap();
    assert_eq!(r.len(), 7);
    assert_eq!(r[0].unit.as_deref(), Some("V"));
    assert_eq!(r[0].time, 1.276020076001e9);
    for (i, rec) in r.iter().enumerate().skip(1) {
        assert_eq!(rec.name, "urn:dev:ow:10e2073a0108006:current");
        assert_eq!(rec.unit.as_deref(), Some("A"), "bu applies");
        // Absolute (above 2^28): not shifted by now.
        let expected = 1.276020076001e9 - (6 - i) as f64;
        assert!((rec.time - expected).abs() < 1e-6, "{i}: {}", rec.time);
    }
    assert_eq!(num(&r[6]), Number::Float(1.7));
}

#[test]
fn rfc_resolved_pack_is_accepted_unchanged() {
    let text = r#"[
  {"n":"urn:dev:ow:10e2073a0108006:voltage","u":"V","v":120.1,"t":1.276020076001e+09},
  {"n":"urn:dev:ow:10e2073a0108006:current","u":"A","v":1.2,"t":1.276020071001e+09}
]"#;
    let r = json(text).unwrap();
    assert_eq!(r[1].time, 1.276020071001e9);
    // Normalising resolved records is a fixed point.
    let again = decode_json(&normalised_json(&r), now()).unwrap();
    assert_eq!(again, r);
}

#[test]
fn rfc_multiple_data_types() {
    let r = json(
        r#"[
  {"bn":"urn:dev:ow:10e2073a01080063:","n":"temperature","u":"Cel","v":23.4},
  {"n":"label","vs":"Machine Room"},
  {"n":"open","vb":false},
  {"n":"nfc-reader","vd":"aGkgCg"}
]"#,
    )
    .unwrap();
    assert_eq!(r[1].value, Some(SenmlValue::String("Machine Room".into())));
    assert_eq!(r[2].value, Some(SenmlValue::Bool(false)));
    assert_eq!(r[3].value, Some(SenmlValue::Data(b"hi \n".to_vec())));
    assert_eq!(r[3].name, "urn:dev:ow:10e2073a01080063:nfc-reader");
}

#[test]
fn rfc_collection_of_resources() {
    let r = json(
        r#"[
  {"bn":"2001:db8::2/","bt":1.320078429e+09,"n":"temperature","u":"Cel","v":27.2},
  {"n":"humidity","u":"%RH","v":80}
]"#,
    )
    .unwrap();
    assert_eq!(r[1].name, "2001:db8::2/humidity");
    assert_eq!(r[1].time, 1.320078429e9);
    assert_eq!(num(&r[1]), Number::Int(80), "an integer stays an integer");
}

#[test]
fn rfc_records_named_by_base_name_alone_with_relative_offsets() {
    let r = json(
        r#"[
  {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,"bu":"%RH","v":20},
  {"u":"lon","v":24.30621},
  {"u":"lat","v":60.07965},
  {"t":60,"v":20.3},
  {"u":"lon","t":60,"v":24.30622},
  {"u":"lat","t":60,"v":60.07965},
  {"t":120,"v":20.7},
  {"u":"%EL","t":150,"vb":true},
  {"t":180,"v":21.2}
]"#,
    )
    .unwrap();
    assert_eq!(r.len(), 9);
    assert!(r.iter().all(|x| x.name == "urn:dev:ow:10e2073a01080063"));
    assert_eq!(num(&r[0]), Number::Int(20));
    assert_eq!(r[1].unit.as_deref(), Some("lon"));
    assert_eq!(r[3].unit.as_deref(), Some("%RH"));
    assert_eq!(r[3].time, 1.320067464e9 + 60.0);
    assert_eq!(r[8].time, 1.320067464e9 + 180.0);
}

#[test]
fn rfc_actuator_and_sum() {
    let r = json(
        r#"[
  {"bn":"urn:dev:ow:10e2073a01080063:","n":"light","vb":true},
  {"n":"energy","u":"J","s":1000},
  {"n":"meter","bs":500,"s":25,"v":2}
]"#,
    )
    .unwrap();
    assert_eq!(r[1].value, None, "a sum alone is enough");
    assert_eq!(r[1].sum, Some(Number::Int(1000)));
    assert_eq!(r[2].sum, Some(Number::Int(525)), "base sum added");
    assert_eq!(num(&r[2]), Number::Int(2));
}

#[test]
fn relative_times_are_resolved_against_now() {
    let r = json(r#"[{"n":"a","t":-10,"v":1},{"n":"b","bt":-5,"t":2,"v":1}]"#).unwrap();
    assert_eq!(r[0].time, NOW - 10.0);
    assert_eq!(r[1].time, NOW - 3.0);
}

#[test]
fn base_value_is_added_and_integers_stay_exact() {
    let r = json(r#"[{"n":"c","bv":9007199254740992,"v":1},{"n":"d","v":2.5}]"#).unwrap();
    assert_eq!(num(&r[0]), Number::Int(9_007_199_254_740_993));
    assert_eq!(num(&r[1]), Number::Float(9_007_199_254_740_994.5));
    // Overflow falls back to float rather than wrapping.
    let r = json(r#"[{"n":"c","bv":9223372036854775807,"v":1}]"#).unwrap();
    assert!(matches!(num(&r[0]), Number::Float(_)));
}

#[test]
fn integer_and_float_values_in_cbor() {
    // [{0:"a", 2: 21}, {0:"b", 2: -3}, {0:"c", 2: 1.5 (f16)}, {0:"d", 2: 1.5 (f32)}]
    let bytes = hex("84 a2 00 61 61 02 15
            a2 00 61 62 02 22
            a2 00 61 63 02 f9 3e 00
            a2 00 61 64 02 fa 3f c0 00 00");
    let r = decode_cbor(&bytes, now()).unwrap();
    assert_eq!(num(&r[0]), Number::Int(21));
    assert_eq!(num(&r[1]), Number::Int(-3));
    assert_eq!(num(&r[2]), Number::Float(1.5));
    assert_eq!(num(&r[3]), Number::Float(1.5));
}

#[test]
fn unknown_labels_are_ignored_mandatory_ones_refused() {
    let r = json(r#"[{"n":"a","v":1,"foo":{"x":[1,2]},"bar":null}]"#).unwrap();
    assert_eq!(r.len(), 1);
    let err = json(r#"[{"n":"a","v":1},{"n":"b","v":1,"foo_":1}]"#).unwrap_err();
    assert_eq!(
        err,
        PayloadError::SenmlRecord {
            record: 1,
            problem: SenmlProblem::MandatoryLabel("foo_".into())
        }
    );
    assert!(err.to_string().contains("record 1"), "{err}");
    // CBOR: unknown integer key ignored, text key ending in _ refused.
    let ok = hex("81 a3 00 61 61 02 01 18 63 82 01 02");
    assert_eq!(decode_cbor(&ok, now()).unwrap().len(), 1);
    let bad = hex("81 a3 00 61 61 02 01 64 66 6f 6f 5f 01");
    assert!(matches!(
        decode_cbor(&bad, now()),
        Err(PayloadError::SenmlRecord {
            problem: SenmlProblem::MandatoryLabel(_),
            ..
        })
    ));
}

#[test]
fn record_problems_say_which_record() {
    let cases = [
        (
            r#"[{"n":"a","v":1},{"n":"b"}]"#,
            1,
            SenmlProblem::MissingValue,
        ),
        (r#"[{"v":1}]"#, 0, SenmlProblem::MissingName),
        (
            r#"[{"n":"a","v":1,"vs":"x"}]"#,
            0,
            SenmlProblem::MultipleValues,
        ),
        (
            r#"[{"n":"a","v":"1"}]"#,
            0,
            SenmlProblem::WrongType {
                label: "v",
                expected: "a number",
            },
        ),
        (
            r#"[{"n":"-a","v":1}]"#,
            0,
            SenmlProblem::InvalidName("-a".into()),
        ),
        (
            r#"[{"n":"a b","v":1}]"#,
            0,
            SenmlProblem::InvalidName("a b".into()),
        ),
        (
            r#"[{"n":"a","v":1,"v":2}]"#,
            0,
            SenmlProblem::DuplicateLabel("v".into()),
        ),
        (
            r#"[{"n":"a","v":1,"bver":11}]"#,
            0,
            SenmlProblem::UnsupportedVersion(11),
        ),
        (r#"[{"n":"a","vd":"a$"}]"#, 0, SenmlProblem::BadBase64),
        (r#"[{"n":"a","v":1}, 3]"#, 1, SenmlProblem::NotAMap),
    ];
    for (text, record, problem) in cases {
        let err = json(text).unwrap_err();
        assert_eq!(
            err,
            PayloadError::SenmlRecord {
                record,
                problem: problem.clone()
            },
            "{text}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("SenML record {record}: "))
        );
    }
    assert_eq!(
        json(r#"{"n":"a","v":1}"#).unwrap_err(),
        PayloadError::SenmlPack(SenmlProblem::NotAnArray)
    );
    assert_eq!(json("[]").unwrap(), vec![]);
}

/// Found by `tests/payload_fuzz.rs`: each field was finite, their sum was not, and the pack was
/// accepted with an infinite value that the normalised JSON stored as `null`.
#[test]
fn base_plus_field_beyond_f64_is_refused_not_stored_as_null() {
    for (pack, label) in [
        (r#"[{"n":"a","bv":1e308,"v":1e308}]"#, "bv + v"),
        (r#"[{"n":"a","bt":1e308,"t":1e308,"v":1}]"#, "bt + t"),
        (r#"[{"n":"a","bt":-1.7e308,"t":-1.7e308,"v":1}]"#, "bt + t"),
        (r#"[{"n":"a","bs":-1e308,"s":-1e308}]"#, "bs + s"),
        // The base carries over to a later record.
        (
            r#"[{"n":"a","bv":1e308,"v":1},{"n":"b","v":1e308}]"#,
            "bv + v",
        ),
    ] {
        let record = usize::from(pack.contains(r#""n":"b""#));
        assert_eq!(
            json(pack),
            Err(PayloadError::SenmlRecord {
                record,
                problem: SenmlProblem::NotFinite(label),
            }),
            "{pack}"
        );
    }
    // The same in CBOR: [{-5: 1e308, 0: "a", 2: 1e308}] with double floats.
    let cbor = hex("81 a3 24 fb 7f e1 cc f3 85 eb c8 a0 00 61 61 02 fb 7f e1 cc f3 85 eb c8 a0");
    assert_eq!(
        decode_cbor(&cbor, now()),
        Err(PayloadError::SenmlRecord {
            record: 0,
            problem: SenmlProblem::NotFinite("bv + v"),
        })
    );
    // Large but finite sums are fine.
    let r = json(r#"[{"n":"a","bv":1e308,"v":-1e308}]"#).unwrap();
    assert_eq!(num(&r[0]), Number::Float(0.0));
}

#[test]
fn cbor_problems() {
    // Non-finite float.
    let nan = hex("81 a2 00 61 61 02 f9 7e 00");
    assert!(matches!(
        decode_cbor(&nan, now()),
        Err(PayloadError::SenmlRecord {
            problem: SenmlProblem::NotFinite("v"),
            ..
        })
    ));
    // Trailing garbage after the pack.
    let mut trailing = hex("81 a2 00 61 61 02 01");
    trailing.push(0x00);
    assert!(matches!(
        decode_cbor(&trailing, now()),
        Err(PayloadError::TrailingBytes { offset: 7, .. })
    ));
    // Truncated.
    assert!(decode_cbor(&hex("82 a2 00 61 61 02 01"), now()).is_err());
    // vd must be a byte string in CBOR.
    assert!(decode_cbor(&hex("81 a2 00 61 61 08 61 61"), now()).is_err());
    // Indefinite-length pack and record.
    let r = decode_cbor(&hex("9f bf 00 61 61 08 42 01 02 ff ff"), now()).unwrap();
    assert_eq!(r[0].value, Some(SenmlValue::Data(vec![1, 2])));
    // Deeply nested unknown label value is bounded.
    let mut deep = hex("81 a3 00 61 61 02 01 18 63");
    deep.extend(std::iter::repeat_n(0x81, 10_000));
    deep.push(0x00);
    assert!(matches!(
        decode_cbor(&deep, now()),
        Err(PayloadError::TooDeep { .. })
    ));
}

#[test]
fn bad_utf8_in_cbor_text_is_refused() {
    assert!(decode_cbor(&hex("81 a2 00 62 ff fe 02 01"), now()).is_err());
}

#[test]
fn trailing_garbage_in_json_is_refused() {
    assert!(json(r#"[{"n":"a","v":1}] ]"#).is_err());
}

#[test]
fn normalised_forms_round_trip() {
    let r = json(
        r#"[{"bn":"dev/","bt":1.7e9,"n":"t","u":"Cel","v":21},
            {"n":"x","vd":"AAEC","ut":60},{"n":"s","s":1.5},{"n":"b","vb":true,"t":0.25}]"#,
    )
    .unwrap();
    let from_json = decode_json(&normalised_json(&r), now()).unwrap();
    let from_cbor = decode_cbor(&normalised_cbor(&r), now()).unwrap();
    assert_eq!(from_json, r);
    assert_eq!(from_cbor, r);
    let text = String::from_utf8(normalised_json(&r)).unwrap();
    assert!(text.contains(r#""v":21"#), "{text}");
    assert!(text.contains(r#""t":1700000000"#), "{text}");
}

#[test]
fn base64url() {
    for data in [&b""[..], b"h", b"hi", b"hi ", b"hi \n", &[0xfb, 0xff, 0xfe]] {
        assert_eq!(
            base64url_decode(&base64url_encode(data)).as_deref(),
            Some(data)
        );
    }
    assert_eq!(base64url_decode("-_8"), Some(vec![0xfb, 0xff]));
    assert_eq!(base64url_decode("A"), None);
}

mod prop {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn no_decoder_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for f in ContentFormat::ALL {
                let _ = validate(f, &bytes, now());
            }
        }

        #[test]
        fn no_decoder_panics_on_mutated_valid_packs(
            flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8),
            cut in 0usize..200,
        ) {
            let mut cbor = hex(
                "82 a4 21 78 1c 75 72 6e 3a 64 65 76 3a 6f 77 3a
                 31 30 65 32 30 37 33 61 30 31 30 38 30 30 36 33
                 3a 00 67 76 6f 6c 74 61 67 65 01 61 56 02 fb 40
                 5e 06 66 66 66 66 66 a3 00 67 63 75 72 72 65 6e
                 74 01 61 41 02 fb 3f f3 33 33 33 33 33 33",
            );
            let mut text = MULTIPLE_DATAPOINTS.as_bytes().to_vec();
            for (i, b) in &flips {
                let n = cbor.len();
                cbor[i % n] = *b;
                let n = text.len();
                text[i % n] = *b;
            }
            cbor.truncate(cut.max(1));
            for f in ContentFormat::ALL {
                let _ = validate(f, &cbor, now());
                let _ = validate(f, &text, now());
            }
        }

        #[test]
        fn resolved_records_round_trip_through_both_normal_forms(
            values in proptest::collection::vec((any::<i64>(), -1.0e12f64..1.0e12), 1..10)
        ) {
            let text = serde_json::to_string(
                &values
                    .iter()
                    .enumerate()
                    .map(|(i, (iv, fv))| {
                        if i % 2 == 0 {
                            serde_json::json!({"n": format!("r{i}"), "v": iv, "t": 1.7e9})
                        } else {
                            serde_json::json!({"n": format!("r{i}"), "v": fv, "t": 1.7e9})
                        }
                    })
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            let r = decode_json(text.as_bytes(), now()).unwrap();
            prop_assert_eq!(&decode_json(&normalised_json(&r), now()).unwrap(), &r);
            prop_assert_eq!(&decode_cbor(&normalised_cbor(&r), now()).unwrap(), &r);
        }
    }
}
