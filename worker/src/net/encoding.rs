//! Text encodings for [`Socket::set_encoding`](super::Socket::set_encoding), and the streaming
//! decoder behind [`Socket::read_text`](super::Socket::read_text) (Node's `StringDecoder`).
//!
//! Bytes arrive in chunks that need not end on a character boundary. The decoder keeps the
//! incomplete tail of a chunk (part of a UTF-8 sequence, an odd UTF-16 byte or a lone high
//! surrogate, a base64 group of fewer than three bytes) and decodes it with the next chunk, so a
//! multi-byte character is never split or replaced just because it straddled two reads.

use std::fmt;
use std::str::FromStr;

/// A text encoding Node accepts in `socket.setEncoding(encoding)`.
///
/// Parses from Node's names, ignoring ASCII case: `utf8`/`utf-8`, `utf16le`/`utf-16le`/`ucs2`/
/// `ucs-2`, `latin1`/`binary`, `ascii`, `hex`, `base64`, `base64url`. Displays as the canonical
/// Node name. The default is UTF-8, as for Node's `setEncoding()` without an argument.
///
/// ```
/// use netcluster_worker::net::Encoding;
/// assert_eq!("UTF-8".parse::<Encoding>()?, Encoding::Utf8);
/// assert_eq!("binary".parse::<Encoding>()?, Encoding::Latin1);
/// assert_eq!(Encoding::Utf16le.to_string(), "utf16le");
/// assert!("ebcdic".parse::<Encoding>().is_err());
/// # Ok::<(), netcluster_worker::net::UnknownEncoding>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// UTF-8; invalid sequences decode to U+FFFD.
    #[default]
    Utf8,
    /// UTF-16 little-endian (`ucs2`); unpaired surrogates decode to U+FFFD.
    Utf16le,
    /// ISO-8859-1: each byte is the code point of the same value (`binary`).
    Latin1,
    /// 7-bit ASCII: as Node does, the high bit of each byte is cleared.
    Ascii,
    /// Two lower-case hex digits per byte.
    Hex,
    /// Standard base64 with `=` padding.
    Base64,
    /// URL-safe base64 without padding.
    Base64url,
}

impl Encoding {
    /// The canonical Node name (`"utf8"`, `"utf16le"`, `"latin1"`, `"ascii"`, `"hex"`,
    /// `"base64"`, `"base64url"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Utf8 => "utf8",
            Encoding::Utf16le => "utf16le",
            Encoding::Latin1 => "latin1",
            Encoding::Ascii => "ascii",
            Encoding::Hex => "hex",
            Encoding::Base64 => "base64",
            Encoding::Base64url => "base64url",
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Encoding {
    type Err = UnknownEncoding;

    /// Parses one of Node's encoding names, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let known = [
            ("utf8", Encoding::Utf8),
            ("utf-8", Encoding::Utf8),
            ("utf16le", Encoding::Utf16le),
            ("utf-16le", Encoding::Utf16le),
            ("ucs2", Encoding::Utf16le),
            ("ucs-2", Encoding::Utf16le),
            ("latin1", Encoding::Latin1),
            ("binary", Encoding::Latin1),
            ("ascii", Encoding::Ascii),
            ("hex", Encoding::Hex),
            ("base64", Encoding::Base64),
            ("base64url", Encoding::Base64url),
        ];
        known
            .iter()
            .find(|(name, _)| s.eq_ignore_ascii_case(name))
            .map(|(_, e)| *e)
            .ok_or_else(|| UnknownEncoding(s.to_owned()))
    }
}

/// An encoding name Node does not know (Node's `ERR_UNKNOWN_ENCODING`); holds the name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown encoding {0:?}: expected utf8, utf16le, latin1, ascii, hex, base64 or base64url")]
pub struct UnknownEncoding(pub String);

/// A streaming decoder: [`TextDecoder::decode`] for each chunk, [`TextDecoder::finish`] at the
/// end of the stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct TextDecoder {
    encoding: Encoding,
    /// Raw bytes of an incomplete character (or base64 group) from the last chunk.
    pending: Vec<u8>,
}

impl TextDecoder {
    /// Switches the encoding; bytes held from the last chunk are decoded with the new one.
    pub(crate) fn set_encoding(&mut self, encoding: Encoding) {
        self.encoding = encoding;
    }

    /// Raw bytes received but not yet decoded (at most three).
    pub(crate) fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Removes the first `n` pending bytes (they were handed out undecoded).
    pub(crate) fn consume_pending(&mut self, n: usize) {
        self.pending.drain(..n.min(self.pending.len()));
    }

    /// Decodes `input` after any bytes held from the previous chunk, holding back a trailing
    /// incomplete character.
    pub(crate) fn decode(&mut self, input: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(input);
        match self.encoding {
            Encoding::Utf8 => self.decode_utf8(&bytes),
            Encoding::Utf16le => self.decode_utf16le(&bytes),
            Encoding::Latin1 => bytes.iter().map(|&b| char::from(b)).collect(),
            Encoding::Ascii => bytes.iter().map(|&b| char::from(b & 0x7f)).collect(),
            Encoding::Hex => hex(&bytes),
            Encoding::Base64 | Encoding::Base64url => {
                let whole = bytes.len() - bytes.len() % 3;
                self.pending = bytes[whole..].to_vec();
                base64(&bytes[..whole], self.encoding == Encoding::Base64)
            }
        }
    }

    /// Ends the stream: decodes what is held back (an incomplete UTF-8 or UTF-16 character
    /// becomes U+FFFD, a short base64 group is encoded with padding for `base64`).
    pub(crate) fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        if rest.is_empty() {
            return String::new();
        }
        match self.encoding {
            Encoding::Utf8 => "\u{FFFD}".to_owned(),
            // A held high surrogate is unpaired; a single odd byte is no character at all.
            Encoding::Utf16le if rest.len() >= 2 => "\u{FFFD}".to_owned(),
            Encoding::Utf16le => String::new(),
            Encoding::Base64 => base64(&rest, true),
            Encoding::Base64url => base64(&rest, false),
            Encoding::Latin1 | Encoding::Ascii | Encoding::Hex => String::new(),
        }
    }

    fn decode_utf8(&mut self, bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len());
        let mut rest = bytes;
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    out.push_str(text);
                    return out;
                }
                Err(e) => {
                    let (valid, tail) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            rest = &tail[bad..];
                        }
                        None => {
                            // The chunk ends inside a character: keep its first bytes.
                            self.pending = tail.to_vec();
                            return out;
                        }
                    }
                }
            }
        }
    }

    fn decode_utf16le(&mut self, bytes: &[u8]) -> String {
        let mut units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|p| u16::from_le_bytes([p[0], p[1]]))
            .collect();
        let mut keep_from = units.len() * 2;
        if units.last().is_some_and(|u| (0xD800..=0xDBFF).contains(u)) {
            // A high surrogate whose pair is in the next chunk.
            units.pop();
            keep_from -= 2;
        }
        self.pending = bytes[keep_from..].to_vec();
        char::decode_utf16(units)
            .map(|c| c.unwrap_or('\u{FFFD}'))
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn base64(bytes: &[u8], standard: bool) -> String {
    let alphabet: &[u8; 64] = if standard {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    };
    let sextet = |v: u32, shift: u32| char::from(alphabet[((v >> shift) & 0x3f) as usize]);
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let v = group
            .iter()
            .enumerate()
            .fold(0u32, |v, (i, &b)| v | u32::from(b) << (16 - 8 * i));
        let chars = group.len() + 1;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i < chars {
                out.push(sextet(v, shift));
            } else if standard {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder(encoding: Encoding) -> TextDecoder {
        let mut d = TextDecoder::default();
        d.set_encoding(encoding);
        d
    }

    #[test]
    fn parses_node_names_and_rejects_others_naming_them() {
        for (name, e) in [
            ("utf8", Encoding::Utf8),
            ("UTF-8", Encoding::Utf8),
            ("ucs2", Encoding::Utf16le),
            ("UTF-16LE", Encoding::Utf16le),
            ("binary", Encoding::Latin1),
            ("Latin1", Encoding::Latin1),
            ("ascii", Encoding::Ascii),
            ("hex", Encoding::Hex),
            ("base64", Encoding::Base64),
            ("base64url", Encoding::Base64url),
        ] {
            assert_eq!(name.parse::<Encoding>(), Ok(e), "{name}");
            assert_eq!(e.as_str().parse::<Encoding>(), Ok(e));
        }
        let err = "utf7".parse::<Encoding>().expect_err("unknown");
        assert!(err.to_string().contains("\"utf7\""), "{err}");
        assert_eq!(Encoding::default(), Encoding::Utf8);
    }

    #[test]
    fn utf8_character_split_across_chunks_is_kept_whole() {
        let text = "a€😀b";
        let bytes = text.as_bytes();
        // Every split point, including inside the 3- and 4-byte characters.
        for cut in 0..=bytes.len() {
            let mut d = decoder(Encoding::Utf8);
            let mut out = d.decode(&bytes[..cut]);
            out += &d.decode(&bytes[cut..]);
            out += &d.finish();
            assert_eq!(out, text, "cut at {cut}");
        }
        // One byte at a time.
        let mut d = decoder(Encoding::Utf8);
        let out: String = bytes.iter().map(|b| d.decode(&[*b])).collect();
        assert_eq!(out, text);
        assert!(d.pending().is_empty());
    }

    #[test]
    fn utf8_invalid_bytes_become_replacement_characters() {
        let mut d = decoder(Encoding::Utf8);
        assert_eq!(d.decode(b"a\xffb"), "a\u{FFFD}b");
        // An incomplete character at the end of the stream.
        assert_eq!(d.decode(b"c\xe2\x82"), "c");
        assert_eq!(d.pending(), b"\xe2\x82");
        assert_eq!(d.finish(), "\u{FFFD}");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn utf16le_surrogate_pairs_and_odd_bytes_across_chunks() {
        let text = "h😀é";
        let bytes: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        for cut in 0..=bytes.len() {
            let mut d = decoder(Encoding::Utf16le);
            let mut out = d.decode(&bytes[..cut]);
            out += &d.decode(&bytes[cut..]);
            out += &d.finish();
            assert_eq!(out, text, "cut at {cut}");
        }
        let mut d = decoder(Encoding::Utf16le);
        assert_eq!(d.decode(&[0x3d, 0xd8]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }

    #[test]
    fn single_byte_and_hex_encodings() {
        assert_eq!(decoder(Encoding::Latin1).decode(b"caf\xe9"), "café");
        assert_eq!(decoder(Encoding::Ascii).decode(b"caf\xe9"), "cafi");
        assert_eq!(decoder(Encoding::Hex).decode(b"\x00\xabZ"), "00ab5a");
    }

    #[test]
    fn base64_holds_partial_groups_until_the_next_chunk_or_the_end() {
        let mut d = decoder(Encoding::Base64);
        assert_eq!(d.decode(b"ab"), "");
        assert_eq!(d.decode(b"cd"), "YWJj");
        assert_eq!(d.finish(), "ZA==");
        let mut d = decoder(Encoding::Base64url);
        assert_eq!(d.decode(b"\xfb\xff\xfe\xfb"), "-__-");
        assert_eq!(d.finish(), "-w");
    }

    #[test]
    fn changing_encoding_keeps_held_bytes() {
        let mut d = decoder(Encoding::Utf8);
        assert_eq!(d.decode(b"\xc3"), "");
        d.set_encoding(Encoding::Hex);
        assert_eq!(d.decode(b"\xa9"), "c3a9");
        d.consume_pending(5);
        assert!(d.pending().is_empty());
    }
}
