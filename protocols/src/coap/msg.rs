//! Message helpers on top of coap-lite's `Packet`: raw codes, uint and block options, building
//! responses. coap-lite's enums are used only at the edges; codes are handled as the raw byte
//! (`class << 5 | detail`) so every code, known to coap-lite or not, round-trips.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet};

/// Response and request codes we use, as raw bytes.
pub(crate) mod code {
    pub const EMPTY: u8 = 0x00;
    pub const GET: u8 = 0x01;
    pub const POST: u8 = 0x02;
    pub const PUT: u8 = 0x03;
    pub const CREATED: u8 = 0x41;
    pub const CHANGED: u8 = 0x44;
    pub const CONTENT: u8 = 0x45;
    pub const CONTINUE: u8 = 0x5f;
    pub const BAD_REQUEST: u8 = 0x80;
    pub const BAD_OPTION: u8 = 0x82;
    pub const NOT_FOUND: u8 = 0x84;
    pub const METHOD_NOT_ALLOWED: u8 = 0x85;
    pub const REQUEST_ENTITY_INCOMPLETE: u8 = 0x88;
    pub const REQUEST_ENTITY_TOO_LARGE: u8 = 0x8d;
    pub const UNSUPPORTED_CONTENT_FORMAT: u8 = 0x8f;
    pub const SERVICE_UNAVAILABLE: u8 = 0xa3;
    pub const PROXYING_NOT_SUPPORTED: u8 = 0xa5;

    /// "c.dd" for logs.
    pub fn fmt(c: u8) -> String {
        format!("{}.{:02}", c >> 5, c & 0x1f)
    }
}

/// Option numbers (RFC 7252 section 5.10, RFC 7641, RFC 7959).
pub(crate) mod opt {
    pub const URI_HOST: u16 = 3;
    pub const OBSERVE: u16 = 6;
    pub const URI_PORT: u16 = 7;
    pub const URI_PATH: u16 = 11;
    pub const CONTENT_FORMAT: u16 = 12;
    pub const MAX_AGE: u16 = 14;
    pub const URI_QUERY: u16 = 15;
    pub const ACCEPT: u16 = 17;
    pub const BLOCK2: u16 = 23;
    pub const BLOCK1: u16 = 27;
    pub const SIZE2: u16 = 28;
    pub const PROXY_URI: u16 = 35;
    pub const PROXY_SCHEME: u16 = 39;
    pub const SIZE1: u16 = 60;

    /// Critical options this server understands; any other critical (odd) option in a request
    /// is answered 4.02 (RFC 7252 section 5.4.1).
    pub const UNDERSTOOD_CRITICAL: [u16; 7] = [
        URI_HOST, URI_PORT, URI_PATH, URI_QUERY, ACCEPT, BLOCK2, BLOCK1,
    ];

    pub fn is_critical(number: u16) -> bool {
        number & 1 == 1
    }
}

pub(crate) fn raw_code(p: &Packet) -> u8 {
    p.header.code.into()
}

/// A uint option value (RFC 7252 section 3.2), at most 4 bytes.
pub(crate) fn uint(bytes: &[u8]) -> Option<u32> {
    (bytes.len() <= 4).then(|| bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

/// Minimal big-endian encoding of a uint option value (0 is empty).
pub(crate) fn uint_bytes(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    b[skip..].to_vec()
}

pub(crate) fn first_opt(p: &Packet, number: u16) -> Option<&Vec<u8>> {
    p.get_first_option(CoapOption::from(number))
}

/// The first value of a uint option: None if absent, Some(Err) if longer than 4 bytes.
pub(crate) fn uint_opt(p: &Packet, number: u16) -> Option<Result<u32, ()>> {
    first_opt(p, number).map(|v| uint(v).ok_or(()))
}

pub(crate) fn set_uint(p: &mut Packet, number: u16, v: u32) {
    p.clear_option(CoapOption::from(number));
    p.add_option(CoapOption::from(number), uint_bytes(v));
}

/// A Block1/Block2 option value (RFC 7959 section 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    /// Block number.
    pub num: u32,
    /// More blocks follow.
    pub more: bool,
    /// Size exponent: the block is `16 << szx` bytes. 7 (BERT) is not used over UDP.
    pub szx: u8,
}

impl Block {
    pub fn parse(bytes: &[u8]) -> Option<Block> {
        let v = uint(bytes)?;
        if bytes.len() > 3 {
            return None;
        }
        Some(Block {
            num: v >> 4,
            more: v & 0x8 != 0,
            szx: (v & 0x7) as u8,
        })
    }

    pub fn size(self) -> usize {
        16usize << self.szx.min(6)
    }

    pub fn offset(self) -> usize {
        (self.num as usize).saturating_mul(self.size())
    }

    pub fn value(self) -> u32 {
        (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx)
    }
}

pub(crate) fn block_opt(p: &Packet, number: u16) -> Option<Result<Block, ()>> {
    first_opt(p, number).map(|v| Block::parse(v).ok_or(()))
}

/// The Uri-Path segments, or None if one is not UTF-8.
pub(crate) fn path(p: &Packet) -> Option<Vec<String>> {
    match p.get_option(CoapOption::UriPath) {
        None => Some(Vec::new()),
        Some(list) => list
            .iter()
            .map(|s| String::from_utf8(s.clone()).ok())
            .collect(),
    }
}

/// The Uri-Query arguments, or None if one is not UTF-8.
pub(crate) fn queries(p: &Packet) -> Option<Vec<String>> {
    match p.get_option(CoapOption::UriQuery) {
        None => Some(Vec::new()),
        Some(list) => list
            .iter()
            .map(|s| String::from_utf8(s.clone()).ok())
            .collect(),
    }
}

/// A response to `req` with `code`, echoing its token. The type and message id are set when it
/// is sent (piggy-backed ACK, separate CON, or NON).
pub(crate) fn response(req: &Packet, code: u8) -> Packet {
    let mut p = Packet::new();
    p.header.code = MessageClass::from(code);
    p.set_token(req.get_token().to_vec());
    p
}

/// An empty message (ACK or RST) for message id `mid`.
pub(crate) fn empty(t: MessageType, mid: u16) -> Packet {
    let mut p = Packet::new();
    p.header.set_type(t);
    p.header.code = MessageClass::Empty;
    p.header.message_id = mid;
    p
}

pub(crate) fn with_type(mut p: Packet, t: MessageType, mid: u16) -> Packet {
    p.header.set_type(t);
    p.header.message_id = mid;
    p
}

/// Encodes for UDP; our packets are built to fit (blocks of at most 1024 bytes plus options),
/// so the only limit applied is the UDP datagram maximum.
pub(crate) fn encode(p: &Packet) -> Option<Vec<u8>> {
    p.to_bytes_with_limit(65_507).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn block_values_round_trip() {
        for b in [
            Block {
                num: 0,
                more: true,
                szx: 6,
            },
            Block {
                num: 1000,
                more: false,
                szx: 2,
            },
        ] {
            assert_eq!(Block::parse(&uint_bytes(b.value())), Some(b));
        }
        assert_eq!(Block::parse(&[]).map(|b| b.num), Some(0));
        assert_eq!(Block::parse(&[1, 2, 3, 4]), None);
        assert_eq!(
            Block {
                num: 2,
                more: false,
                szx: 2
            }
            .offset(),
            128
        );
    }

    #[test]
    fn uints_are_minimal() {
        assert_eq!(uint_bytes(0), Vec::<u8>::new());
        assert_eq!(uint_bytes(60), vec![60]);
        assert_eq!(uint_bytes(0x1_0000), vec![1, 0, 0]);
        assert_eq!(uint(&[1, 0, 0]), Some(0x1_0000));
        assert_eq!(uint(&[1, 0, 0, 0, 0]), None);
    }
}
