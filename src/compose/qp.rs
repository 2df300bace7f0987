//! Quoted-printable (RFC 2045, section 6.7) for ASCII text parts whose lines
//! are too long for 7bit, as agents' unwrapped paragraphs are.
//!
//! lettre encodes such bodies with the `quoted_printable` crate at about 38
//! instructions per byte: 12 % of the daemon's instructions per `send_email`
//! at 1 KiB and 40 % at 100 KiB. This encoder copies runs of plain
//! characters whole. The choice of encoding stays lettre's (see
//! `text_part`); only the encoding itself is done here.

/// The longest encoded line, soft line break ("=") included.
const MAX_LINE: usize = 76;

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Encodes ASCII `text` whose line breaks are CRLF. Each CRLF stays a hard
/// line break; longer lines get soft breaks ("=" CRLF) so that no encoded
/// line exceeds 76 characters; "=", control characters other than tab, and a
/// space or tab that ends a line are written as "=XX".
pub(super) fn encode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 16 + 8);
    let mut start = 0;
    for at in memchr::memchr_iter(b'\n', bytes) {
        if at > start && bytes[at - 1] == b'\r' {
            encode_line(&bytes[start..at - 1], &mut out);
            out.extend_from_slice(b"\r\n");
            start = at + 1;
        }
    }
    encode_line(&bytes[start..], &mut out);
    out
}

/// The bytes written as they are: printable ASCII but "=", and space and
/// tab (except at the end of a line, see `encode_line`).
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 33;
    while b <= 126 {
        t[b] = b != b'=' as usize;
        b += 1;
    }
    t[b' ' as usize] = true;
    t[b'\t' as usize] = true;
    t
};

/// One line, without its CRLF. Runs of literal characters are copied whole.
fn encode_line(line: &[u8], out: &mut Vec<u8>) {
    // Characters per output line, leaving room for the "=" of a soft break.
    const ROOM: usize = MAX_LINE - 1;
    let n = line.len();
    let mut width = 0;
    let mut i = 0;
    while i < n {
        let end = n.min(i + (ROOM - width));
        let mut j = i;
        while j < end && PLAIN[usize::from(line[j])] {
            j += 1;
        }
        if j == n && matches!(line[n - 1], b' ' | b'\t') {
            // A space or tab that ends the line is escaped.
            j -= 1;
        }
        out.extend_from_slice(&line[i..j]);
        width += j - i;
        i = j;
        if i == n {
            break;
        }
        if j == end
            && PLAIN[usize::from(line[j])]
            && !(j + 1 == n && matches!(line[j], b' ' | b'\t'))
        {
            // The run reached the end of the output line.
            out.extend_from_slice(b"=\r\n");
            width = 0;
            continue;
        }
        let b = line[i];
        if width + 3 > ROOM {
            out.extend_from_slice(b"=\r\n");
            width = 0;
        }
        out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        width += 3;
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::{MAX_LINE, encode};

    fn decode(encoded: &[u8]) -> Vec<u8> {
        quoted_printable::decode(encoded, quoted_printable::ParseMode::Strict)
            .expect("valid quoted-printable")
    }

    /// Every output line is at most 76 characters, printable ASCII, and does
    /// not end in a space or tab.
    fn assert_well_formed(encoded: &[u8]) {
        for line in encoded.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(
                line.len() <= MAX_LINE,
                "{:?}",
                String::from_utf8_lossy(line)
            );
            assert!(
                line.iter()
                    .all(|b| (33..=126).contains(b) || *b == b' ' || *b == b'\t')
            );
            assert!(!line.ends_with(b" ") && !line.ends_with(b"\t"));
        }
        assert!(!encoded.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
    }

    #[test]
    fn plain_short_lines_are_unchanged() {
        assert_eq!(encode("Hello there.\r\nBye."), b"Hello there.\r\nBye.");
        assert_eq!(encode(""), b"");
        assert_eq!(encode("\r\n"), b"\r\n");
    }

    #[test]
    fn equals_controls_and_trailing_blanks_are_escaped() {
        assert_eq!(encode("a=b"), b"a=3Db");
        assert_eq!(encode("tab\there \r\nend\t"), b"tab\there=20\r\nend=09");
        assert_eq!(encode("bell\x07 del\x7f"), b"bell=07 del=7F");
        assert_eq!(encode("a\rb\nc"), b"a=0Db=0Ac");
    }

    #[test]
    fn long_lines_get_soft_breaks_at_76() {
        let line = "x".repeat(200);
        let encoded = encode(&line);
        assert_well_formed(&encoded);
        assert_eq!(decode(&encoded), line.as_bytes());
        let first = encoded.split(|&b| b == b'\r').next().unwrap();
        assert_eq!(first.len(), MAX_LINE, "75 characters and the soft break");
        assert_eq!(encode(&"y".repeat(75)), "y".repeat(75).as_bytes());
        for n in 74..=153 {
            let line = "y".repeat(n);
            let encoded = encode(&line);
            assert_well_formed(&encoded);
            assert_eq!(decode(&encoded), line.as_bytes());
        }
        // An escape is never split by a soft break.
        let escapes = format!("{}={}", "z".repeat(74), "z".repeat(10));
        let encoded = encode(&escapes);
        assert_well_formed(&encoded);
        assert_eq!(decode(&encoded), escapes.as_bytes());
    }

    #[test]
    fn random_text_round_trips_through_the_quoted_printable_crate() {
        let alphabet: Vec<u8> = (0u8..=127).filter(|&b| b != 0).collect();
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for _ in 0..2_000 {
            let len = rng.random_range(0..400);
            let mut text = String::with_capacity(len);
            for _ in 0..len {
                match rng.random_range(0..10) {
                    0 => text.push_str("\r\n"),
                    1 => text.push(' '),
                    2 => text.push('='),
                    3 => text.push('\t'),
                    _ => text.push(char::from(alphabet[rng.random_range(0..alphabet.len())])),
                }
            }
            let encoded = encode(&text);
            assert_well_formed(&encoded);
            assert_eq!(decode(&encoded), text.as_bytes(), "{text:?}");
        }
    }
}
