//! What is inside an archive, for the content checks: the files of a zip
//! (stored or deflated; Office documents are zips too) and the content of
//! a gzip, and the archives inside those, so that a key or a list zipped
//! by an agent is looked at as it would be unzipped.
//!
//! Reading is bounded, so that a small attachment cannot make the daemon
//! inflate gigabytes (a zip bomb): at most [`MAX_UNPACKED`] bytes in all,
//! [`MAX_FILES`] files and [`MAX_DEPTH`] archives deep. An archive that
//! cannot be read whole within them (encrypted, another compression
//! method, damaged, too large) is [`Unreadable`]: the checks cannot say
//! what it holds. Other formats (7z, rar, a password-protected Office
//! file, a PDF's compressed streams) are scanned as their bytes are; a tar
//! holds its files as they are, so its bytes are what it holds.

use std::io::{Cursor, Read};

/// Most bytes unpacked from one attachment, every level together.
pub const MAX_UNPACKED: usize = 8 << 20;
/// Most files read from one attachment, every level together.
pub const MAX_FILES: usize = 1_000;
/// Most archives one inside another (a zip in a zip is two).
pub const MAX_DEPTH: usize = 3;

/// An archive the checks cannot read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// What is left of the bounds while one attachment is read.
struct Budget {
    bytes: usize,
    files: usize,
}

/// Calls `each` with the name (none for a gzip's content) and the bytes of
/// every file inside `data`, at every level, when `data` is a zip or a
/// gzip; calls nothing for other data. `Err` when an archive in it cannot
/// be read whole within the bounds: `each` may have seen some of it.
pub fn unpack(data: &[u8], each: &mut dyn FnMut(Option<&str>, &[u8])) -> Result<(), Unreadable> {
    let mut budget = Budget {
        bytes: MAX_UNPACKED,
        files: MAX_FILES,
    };
    walk(data, 1, &mut budget, each)
}

/// Whether `data` is a zip or a gzip, which [`unpack`] opens.
pub fn is_archive(data: &[u8]) -> bool {
    is_zip(data) || is_gzip(data)
}

fn is_zip(data: &[u8]) -> bool {
    // A local file header, or the end record of an empty archive.
    data.starts_with(b"PK\x03\x04") || data.starts_with(b"PK\x05\x06")
}

fn is_gzip(data: &[u8]) -> bool {
    data.starts_with(&[0x1f, 0x8b])
}

fn walk(
    data: &[u8],
    depth: usize,
    budget: &mut Budget,
    each: &mut dyn FnMut(Option<&str>, &[u8]),
) -> Result<(), Unreadable> {
    if !is_archive(data) {
        return Ok(());
    }
    if depth > MAX_DEPTH {
        return Err(Unreadable);
    }
    if is_gzip(data) {
        let inner = bounded(flate2::read::GzDecoder::new(data), budget)?;
        each(None, &inner);
        return walk(&inner, depth + 1, budget, each);
    }
    let mut zip = zip::ZipArchive::new(Cursor::new(data)).map_err(|_| Unreadable)?;
    for i in 0..zip.len() {
        // An encrypted file, or one compressed otherwise than stored or
        // deflated, is an error here.
        let file = zip.by_index(i).map_err(|_| Unreadable)?;
        if file.is_dir() {
            continue;
        }
        let name = String::from_utf8_lossy(file.name_raw()).into_owned();
        if budget.files == 0 {
            return Err(Unreadable);
        }
        budget.files -= 1;
        let inner = bounded(file, budget)?;
        each(Some(&name), &inner);
        walk(&inner, depth + 1, budget, each)?;
    }
    Ok(())
}

/// All of `reader`, taken from the budget; `Err` past it or on a read
/// error (a damaged stream, a wrong checksum).
fn bounded(reader: impl Read, budget: &mut Budget) -> Result<Vec<u8>, Unreadable> {
    let mut out = Vec::new();
    reader
        .take(budget.bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| Unreadable)?;
    if out.len() > budget.bytes {
        return Err(Unreadable);
    }
    budget.bytes -= out.len();
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use super::*;

    pub(crate) fn zip_of(files: &[(&str, &[u8])], method: zip::CompressionMethod) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default().compression_method(method);
        for (name, data) in files {
            w.start_file(*name, options).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    /// `zip` with every file marked encrypted (bit 0 of the general
    /// purpose flags, in its local header and its central directory
    /// entry), as a reader sees a password-protected archive.
    pub(crate) fn encrypted(mut zip: Vec<u8>) -> Vec<u8> {
        for (signature, flags_at) in [(b"PK\x03\x04", 6), (b"PK\x01\x02", 8)] {
            let mut at = 0;
            while let Some(i) = zip[at..].windows(4).position(|w| w == signature) {
                zip[at + i + flags_at] |= 1;
                at += i + 4;
            }
        }
        zip
    }

    pub(crate) fn gzip_of(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A file seen inside an archive: its name, if any, and its bytes.
    type Seen = (Option<String>, Vec<u8>);

    fn seen(data: &[u8]) -> (Vec<Seen>, Result<(), Unreadable>) {
        let mut files = Vec::new();
        let r = unpack(data, &mut |name, bytes| {
            files.push((name.map(str::to_owned), bytes.to_vec()));
        });
        (files, r)
    }

    /// A draft knows an archive by the first bytes its base64 encodes, as
    /// `is_archive` knows it by its bytes: such a draft is composed off the
    /// async workers for a caller with content checks.
    #[test]
    fn an_archive_is_known_by_its_first_bytes_and_by_its_base64() {
        use base64::Engine as _;
        let draft = |data: &[u8]| crate::compose::Draft {
            attachments: vec![crate::compose::AttachmentInput::Inline {
                filename: "a".into(),
                content_base64: format!(
                    " {}",
                    base64::engine::general_purpose::STANDARD.encode(data)
                ),
                content_type: None,
                content_id: None,
            }],
            ..Default::default()
        };
        let stored = zip::CompressionMethod::Stored;
        for data in [
            zip_of(&[("a", b"x")], stored),
            zip_of(&[], stored),
            gzip_of(b"x"),
        ] {
            assert!(is_archive(&data));
            assert!(draft(&data).has_archive(), "{:?}", &data[..4]);
        }
        for data in [&b"PK"[..], b"%PDF-1.4", b"plain text", b"\x1f"] {
            assert!(!is_archive(data));
            assert!(!draft(data).has_archive());
        }
    }

    #[test]
    fn every_file_at_every_level_is_seen() {
        let inner = zip_of(&[("key.pem", b"secret")], zip::CompressionMethod::Deflated);
        let outer = zip_of(
            &[("a.txt", b"plain"), ("inner.zip", &inner)],
            zip::CompressionMethod::Stored,
        );
        let (files, r) = seen(&gzip_of(&outer));
        assert_eq!(r, Ok(()));
        let names: Vec<Option<&str>> = files.iter().map(|(n, _)| n.as_deref()).collect();
        assert_eq!(
            names,
            [None, Some("a.txt"), Some("inner.zip"), Some("key.pem")]
        );
        assert_eq!(files[3].1, b"secret");
        // Not an archive: nothing inside, and readable.
        assert_eq!(seen(b"just text"), (Vec::new(), Ok(())));
    }

    #[test]
    fn what_cannot_be_read_whole_is_unreadable() {
        // Too deep: a gzip in a gzip in a gzip in a gzip.
        let deep = gzip_of(&gzip_of(&gzip_of(&gzip_of(b"x"))));
        assert_eq!(seen(&deep).1, Err(Unreadable));
        assert_eq!(seen(&gzip_of(&gzip_of(&gzip_of(b"x")))).1, Ok(()));
        // A bomb: more than MAX_UNPACKED once inflated.
        let bomb = gzip_of(&vec![0u8; MAX_UNPACKED + 1]);
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        assert_eq!(seen(&bomb).1, Err(Unreadable));
        assert_eq!(seen(&gzip_of(&vec![0u8; MAX_UNPACKED])).1, Ok(()));
        // Too many files.
        let many: Vec<(String, &[u8])> = (0..=MAX_FILES)
            .map(|i| (format!("{i}"), &b"x"[..]))
            .collect();
        let refs: Vec<(&str, &[u8])> = many.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        assert_eq!(
            seen(&zip_of(&refs, zip::CompressionMethod::Stored)).1,
            Err(Unreadable)
        );
        // Encrypted.
        let z = zip_of(&[("a.txt", b"plain text")], zip::CompressionMethod::Stored);
        assert_eq!(seen(&z).1, Ok(()));
        assert_eq!(seen(&encrypted(z)).1, Err(Unreadable));
        // Damaged: a zip cut short, a gzip whose data was changed.
        let z = zip_of(
            &[("a.txt", b"plain text")],
            zip::CompressionMethod::Deflated,
        );
        assert_eq!(seen(&z[..z.len() - 10]).1, Err(Unreadable));
        let mut g = gzip_of(b"some text to change");
        let at = g.len() - 12;
        g[at] ^= 0xff;
        assert_eq!(seen(&g).1, Err(Unreadable));
    }
}
