//! CBOR well-formedness: one item, nothing after it, bounded nesting.
//!
//! minicbor's `Decoder::skip` would accept the item too, but it does not bound nesting depth and
//! does not tell a stray break from the end of an indefinite container as clearly; this walk is
//! short and makes both explicit.

use minicbor::Decoder;
use minicbor::data::Type;

use super::{MAX_CBOR_DEPTH, PayloadError};

/// Ok if `bytes` is exactly one well-formed CBOR item.
pub(crate) fn check_one_item(bytes: &[u8]) -> Result<(), PayloadError> {
    let mut d = Decoder::new(bytes);
    walk(&mut d, 0)?;
    end_of_item(&d)
}

/// Error if anything follows the item the decoder just read.
pub(crate) fn end_of_item(d: &Decoder<'_>) -> Result<(), PayloadError> {
    let offset = d.position();
    let len = d.input().len();
    if offset < len {
        return Err(PayloadError::TrailingBytes {
            offset,
            extra: len - offset,
        });
    }
    Ok(())
}

pub(crate) fn cbor_err(e: minicbor::decode::Error) -> PayloadError {
    PayloadError::Cbor(e.to_string())
}

/// Consumes one item (recursively) at nesting `depth`.
pub(crate) fn walk(d: &mut Decoder<'_>, depth: usize) -> Result<(), PayloadError> {
    if depth > MAX_CBOR_DEPTH {
        return Err(PayloadError::TooDeep {
            max: MAX_CBOR_DEPTH,
            offset: d.position(),
        });
    }
    match d.datatype().map_err(cbor_err)? {
        Type::Bool => d.bool().map(drop),
        Type::Null => d.null(),
        Type::Undefined => d.undefined(),
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => d.u64().map(drop),
        Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => d.int().map(drop),
        Type::F16 => d.f16().map(drop),
        Type::F32 => d.f32().map(drop),
        Type::F64 => d.f64().map(drop),
        Type::Simple => d.simple().map(drop),
        Type::Bytes | Type::BytesIndef => d
            .bytes_iter()
            .and_then(|mut chunks| chunks.try_for_each(|c| c.map(drop))),
        Type::String | Type::StringIndef => d
            .str_iter()
            .and_then(|mut chunks| chunks.try_for_each(|c| c.map(drop))),
        Type::Array | Type::ArrayIndef => {
            let len = d.array().map_err(cbor_err)?;
            return items(d, len, 1, depth);
        }
        Type::Map | Type::MapIndef => {
            let len = d.map().map_err(cbor_err)?;
            return items(d, len, 2, depth);
        }
        Type::Tag => {
            d.tag().map_err(cbor_err)?;
            return walk(d, depth + 1);
        }
        Type::Break => {
            return Err(PayloadError::Cbor(format!(
                "unexpected break at position {}",
                d.position()
            )));
        }
        Type::Unknown(b) => {
            return Err(PayloadError::Cbor(format!(
                "reserved initial byte {b:#04x} at position {}",
                d.position()
            )));
        }
    }
    .map_err(cbor_err)
}

/// The elements of an array (`per_entry` 1) or map (2): `len` entries, or up to a break.
fn items(
    d: &mut Decoder<'_>,
    len: Option<u64>,
    per_entry: u64,
    depth: usize,
) -> Result<(), PayloadError> {
    match len {
        Some(n) => {
            // Each item takes at least one byte: a huge declared length fails at end of input
            // after at most `input.len()` iterations.
            for _ in 0..n.saturating_mul(per_entry) {
                walk(d, depth + 1)?;
            }
        }
        None => {
            let mut count = 0u64;
            loop {
                if d.datatype().map_err(cbor_err)? == Type::Break {
                    if !count.is_multiple_of(per_entry) {
                        return Err(PayloadError::Cbor(format!(
                            "map without a value for its last key at position {}",
                            d.position()
                        )));
                    }
                    d.set_position(d.position() + 1);
                    break;
                }
                walk(d, depth + 1)?;
                count += 1;
            }
        }
    }
    Ok(())
}
