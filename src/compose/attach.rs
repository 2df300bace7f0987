//! Attachments: inline base64 content, or files inside the configured
//! attachments directory.
//!
//! Sizes are checked before anything is decoded or read, and a path never
//! escapes the directory or opens anything but a regular file (a FIFO would
//! block the caller forever).

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use lettre::message::header::ContentType;

use super::address::check_header_value;
use super::{AttachmentInput, ComposeError, ComposePolicy};

/// Longest file name shown to the recipient, in bytes (a common file system
/// limit).
const MAX_FILENAME: usize = 255;

/// Longest content type, parameters included; it must fit one header line
/// because lettre folds it only at spaces.
const MAX_CONTENT_TYPE: usize = 255;

/// Standard alphabet; padding optional, as documented on the tool.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// An attachment ready for the message.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub filename: String,
    pub content_type: ContentType,
    pub content_type_name: String,
    pub data: Vec<u8>,
    /// Shown in the HTML body as `cid:ID` rather than attached.
    pub content_id: Option<String>,
}

/// An image of a template (`[[templates]]`' `images`), read from `path`
/// at load: at most `max` bytes, its type from its file name.
pub(crate) fn image(id: &str, path: &Path, max: usize) -> Result<Loaded, String> {
    check_content_id("content_id", id).map_err(|e| e.message)?;
    let shown = path.display();
    let meta = fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if meta.len() > max as u64 {
        return Err(format!(
            "{shown} is {} bytes, more than max_attachment_bytes ({max})",
            meta.len()
        ));
    }
    let data = fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let filename = path
        .file_name()
        .map_or_else(|| id.to_owned(), |n| n.to_string_lossy().into_owned());
    let name = guess_content_type(&filename);
    let content_type = ContentType::parse(name).map_err(|_| format!("{name}: not a type"))?;
    Ok(Loaded {
        filename,
        content_type,
        content_type_name: name.to_owned(),
        data,
        content_id: Some(id.to_owned()),
    })
}

/// Longest `content_id`.
const MAX_CONTENT_ID: usize = 100;

/// A `content_id` as the HTML body names it (`cid:ID`) and the part's
/// `Content-ID: <ID>` carries it: 1 to [`MAX_CONTENT_ID`] of letters,
/// digits, `.`, `_`, `-` and `@`, so that it needs no quoting in either.
fn check_content_id(field: &str, id: &str) -> Result<(), ComposeError> {
    let invalid = |why: String| ComposeError::new(field, "invalid_content_id", why);
    if id.is_empty() || id.len() > MAX_CONTENT_ID {
        return Err(invalid(format!("must be 1 to {MAX_CONTENT_ID} characters")));
    }
    if let Some(c) = id.chars().find(|c| !is_id_char(*c)) {
        return Err(invalid(format!(
            "may hold letters, digits, '.', '_', '-' and '@' only, not {c:?}"
        )));
    }
    Ok(())
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')
}

/// Whether `html` names `id` as `cid:ID` (the scheme in any case), whole:
/// `cid:logo2` does not name `logo`.
pub(crate) fn names_cid(html: &str, id: &str) -> bool {
    html.match_indices(id).any(|(at, _)| {
        at >= 4
            && html.as_bytes()[at - 4..at].eq_ignore_ascii_case(b"cid:")
            && html[at + id.len()..]
                .chars()
                .next()
                .is_none_or(|c| !is_id_char(c))
    })
}

/// The ids the HTML shows as `cid:ID` links: a `cid:` (in any case) that
/// opens an attribute's value or a CSS `url(`, so that prose which mentions
/// "cid:" is not taken for a link. A link whose id goes on with `%` (a
/// percent-encoded id, RFC 2392) is left out: no `content_id` holds one.
fn cid_links(html: &str) -> impl Iterator<Item = &str> {
    let bytes = html.as_bytes();
    (0..bytes.len().saturating_sub(3)).filter_map(move |at| {
        if !bytes[at..at + 4].eq_ignore_ascii_case(b"cid:") {
            return None;
        }
        let before = bytes[..at].iter().rev().find(|b| !b.is_ascii_whitespace());
        if !matches!(before, Some(b'"' | b'\'' | b'=' | b'(')) {
            return None;
        }
        let rest = &html[at + 4..];
        let end = rest.find(|c: char| !is_id_char(c)).unwrap_or(rest.len());
        (end > 0 && !rest[end..].starts_with('%')).then(|| &rest[..end])
    })
}

/// Checks the attachments that a message's HTML shows (`content_id`):
/// there is HTML (`html`, the body as rendered) to show them, each id is
/// the only one of its kind, and the HTML names each as `cid:ID` (a part
/// it never names would be shown by no client, or as a stray
/// attachment). The attachments past the first `given` are a template's
/// images: an id of the call's that one of them has is the call's mistake.
/// And each `cid:` link of the HTML has its part: a link to none is an
/// image no client can show (refused in `html_field`, the field the HTML
/// came from).
pub(crate) fn check_inline(
    attachments: &[&Loaded],
    html: Option<&str>,
    html_field: &str,
    given: usize,
) -> Result<(), ComposeError> {
    for (i, a) in attachments.iter().enumerate() {
        let Some(id) = &a.content_id else { continue };
        let field = format!("attachments[{i}].content_id");
        let Some(html) = html else {
            return Err(ComposeError::new(
                field,
                "inline_without_html",
                "an attachment with content_id is shown by an HTML body (html_body, or body \
                 with html: true), and this message has none",
            ));
        };
        if let Some(j) = attachments[..i]
            .iter()
            .position(|b| b.content_id.as_deref() == Some(id))
        {
            return Err(if i >= given {
                ComposeError::new(
                    format!("attachments[{j}].content_id"),
                    "duplicate_content_id",
                    format!("{id:?} is the id of an image of the template; give another"),
                )
            } else {
                ComposeError::new(
                    field,
                    "duplicate_content_id",
                    format!("{id:?} is the content_id of an earlier attachment"),
                )
            });
        }
        if !names_cid(html, id) {
            return Err(ComposeError::new(
                field,
                "content_id_unreferenced",
                format!("the HTML body never names cid:{id}: write <img src=\"cid:{id}\">"),
            ));
        }
    }
    if let Some(html) = html
        && let Some(id) = cid_links(html).find(|id| {
            !attachments
                .iter()
                .any(|a| a.content_id.as_deref() == Some(*id))
        })
    {
        return Err(ComposeError::new(
            html_field,
            "unknown_content_id",
            format!(
                "the HTML shows cid:{id}, and no attachment has content_id {id:?}: give the \
                 image as an attachment with \"content_id\": {id:?}, or remove the link"
            ),
        ));
    }
    Ok(())
}

/// Attachments decoded (or read) once for many messages: the `defaults` of a
/// `send_batch`. Each message that has no attachments of its own gets these,
/// encoded into its own bytes; none decodes them again.
#[derive(Debug)]
pub struct Shared {
    loaded: Vec<Loaded>,
    /// What the inputs were, for the idempotency hash of each message.
    pub digest: [u8; 32],
    /// Their size decoded: what decides whether a message that gets them is
    /// composed off the async workers.
    pub decoded_bytes: usize,
    /// What the first scan of them found (a batch's caller's content
    /// checks), kept for every other message of the batch.
    scanned: std::sync::OnceLock<Vec<Vec<usize>>>,
}

impl Shared {
    /// Loads `inputs` as a message's `attachments` would be, checked against
    /// the same limits; an error names the field as in a message
    /// (`attachments[1].content_base64`).
    pub fn load(
        inputs: &[AttachmentInput],
        policy: &ComposePolicy,
    ) -> Result<Shared, ComposeError> {
        use sha2::Digest;
        let mut estimate = 0;
        let loaded = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| load(i, input, policy, &mut estimate))
            .collect::<Result<Vec<_>, _>>()?;
        let digest = sha2::Sha256::digest(serde_json::to_vec(inputs).unwrap_or_default()).into();
        Ok(Shared {
            decoded_bytes: loaded.iter().map(|l| l.data.len()).sum(),
            loaded,
            digest,
            scanned: std::sync::OnceLock::new(),
        })
    }

    /// Whether one of them is a zip or a gzip ([`super::Draft::has_archive`]).
    pub fn has_archive(&self) -> bool {
        self.loaded
            .iter()
            .any(|a| crate::policy::archive::is_archive(&a.data))
    }

    pub(crate) fn loaded(&self) -> &[Loaded] {
        &self.loaded
    }

    /// What `scan` finds in each of them, scanned once: the messages of one
    /// batch have one caller, and so one scan.
    pub(crate) fn scanned_with(&self, scan: super::Scan<'_>) -> &[Vec<usize>] {
        self.scanned
            .get_or_init(|| self.loaded.iter().map(|a| scan(&a.data)).collect())
    }
}

/// Whether base64 `text` starts with the bytes of a zip or a gzip
/// ([`crate::policy::archive::is_archive`]), from its first characters
/// alone.
pub(crate) fn starts_as_archive(text: &str) -> bool {
    // Eight characters are six bytes, past either signature.
    let head: String = text
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .take(8)
        .collect();
    BASE64
        .decode(head)
        .is_ok_and(|b| crate::policy::archive::is_archive(&b))
}

/// Encoded size of `decoded` bytes in the message: base64 (4/3) plus a CRLF
/// every 76 characters, rounded up to 1.37.
pub(crate) fn encoded_estimate(decoded: usize) -> usize {
    decoded.saturating_mul(137) / 100
}

/// The type for a file name from a small table; anything else is
/// `application/octet-stream`.
fn guess_content_type(filename: &str) -> &'static str {
    let ext = Path::new(filename)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("txt") => "text/plain",
        Some("html" | "htm") => "text/html",
        Some("csv") => "text/csv",
        Some("json") => "application/json",
        Some("pdf") => "application/pdf",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("zip") => "application/zip",
        Some("eml") => "message/rfc822",
        _ => "application/octet-stream",
    }
}

fn content_type(
    field: &str,
    given: Option<&str>,
    filename: &str,
) -> Result<(ContentType, String), ComposeError> {
    let Some(given) = given else {
        let name = guess_content_type(filename);
        let parsed = ContentType::parse(name).map_err(|_| {
            ComposeError::new(
                field,
                "invalid_content_type",
                "built-in type failed to parse",
            )
        })?;
        return Ok((parsed, name.to_owned()));
    };
    check_header_value(field, given)?;
    let given = given.trim();
    if given.len() > MAX_CONTENT_TYPE {
        return Err(ComposeError::new(
            field,
            "invalid_content_type",
            format!("is longer than {MAX_CONTENT_TYPE} bytes"),
        ));
    }
    let invalid = |why: &str| ComposeError::new(field, "invalid_content_type", why.to_owned());
    let parsed = ContentType::parse(given)
        .map_err(|_| invalid("is not a MIME type such as `application/pdf`"))?;
    // A multipart type needs a boundary this part does not have.
    if given
        .get(..10)
        .is_some_and(|p| p.eq_ignore_ascii_case("multipart/"))
    {
        return Err(invalid("multipart types cannot be attachments"));
    }
    Ok((parsed, given.to_owned()))
}

fn check_filename(field: &str, name: &str) -> Result<(), ComposeError> {
    check_header_value(field, name)?;
    let invalid = |why: String| ComposeError::new(field, "invalid_filename", why);
    if name.trim().is_empty() {
        return Err(invalid("is empty".into()));
    }
    if name.len() > MAX_FILENAME {
        return Err(invalid(format!("is longer than {MAX_FILENAME} bytes")));
    }
    if name.contains(['/', '\\']) {
        return Err(invalid(
            "contains a path separator; give a bare file name".into(),
        ));
    }
    // `invoice\u{202E}fdp.exe` reads `invoiceexe.pdf` in a mail client.
    if let Some(c) = name.chars().find(|c| is_bidi_control(*c)) {
        return Err(invalid(format!(
            "contains U+{:04X}, a bidirectional control: mail clients would show the name in another order",
            c as u32
        )));
    }
    Ok(())
}

/// The characters that change the order in which text is shown.
pub(crate) fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// The decoded size of valid base64 text, computed from its length alone so
/// that an oversized attachment is refused before any decoding.
fn base64_decoded_len(text: &str) -> usize {
    let significant = text.bytes().filter(|b| !b.is_ascii_whitespace());
    let (mut chars, mut padding) = (0usize, 0usize);
    for b in significant {
        chars += 1;
        padding = if b == b'=' { padding + 1 } else { 0 };
    }
    (chars - padding) / 4 * 3 + ((chars - padding) % 4).saturating_sub(1)
}

fn too_large(field: &str, max: usize) -> ComposeError {
    ComposeError::new(
        field,
        "attachment_too_large",
        format!("is larger than {max} bytes"),
    )
}

/// Loads attachment `index`. `estimate` is the running estimate of the
/// encoded message size; it grows by this attachment's share and is checked
/// against `max_message_bytes` before any decoding or reading.
pub(crate) fn load(
    index: usize,
    input: &AttachmentInput,
    policy: &ComposePolicy,
    estimate: &mut usize,
) -> Result<Loaded, ComposeError> {
    match input {
        AttachmentInput::Inline {
            filename,
            content_base64,
            content_type: given,
            content_id,
        } => {
            let name_field = format!("attachments[{index}].filename");
            check_filename(&name_field, filename)?;
            if let Some(id) = content_id {
                check_content_id(&format!("attachments[{index}].content_id"), id)?;
            }
            let data_field = format!("attachments[{index}].content_base64");
            let decoded = base64_decoded_len(content_base64);
            if decoded > policy.max_attachment_bytes {
                return Err(too_large(&data_field, policy.max_attachment_bytes));
            }
            grow_estimate(index, estimate, decoded, policy)?;
            let compact: Vec<u8> = content_base64
                .bytes()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            let data = BASE64.decode(&compact).map_err(|e| {
                ComposeError::new(
                    &data_field,
                    "invalid_base64",
                    format!("is not valid base64 (standard alphabet): {e}"),
                )
            })?;
            if data.len() > policy.max_attachment_bytes {
                return Err(too_large(&data_field, policy.max_attachment_bytes));
            }
            let (content_type, content_type_name) = content_type(
                &format!("attachments[{index}].content_type"),
                given.as_deref(),
                filename,
            )?;
            Ok(Loaded {
                filename: filename.clone(),
                content_type,
                content_type_name,
                data,
                content_id: content_id.clone(),
            })
        }
        AttachmentInput::Path {
            path,
            content_type: given,
            content_id,
        } => {
            if let Some(id) = content_id {
                check_content_id(&format!("attachments[{index}].content_id"), id)?;
            }
            let field = format!("attachments[{index}].path");
            let (filename, data) = read_path(&field, path, policy, index, estimate)?;
            let (content_type, content_type_name) = content_type(
                &format!("attachments[{index}].content_type"),
                given.as_deref(),
                &filename,
            )?;
            Ok(Loaded {
                filename,
                content_type,
                content_type_name,
                data,
                content_id: content_id.clone(),
            })
        }
    }
}

pub(crate) fn grow_estimate(
    index: usize,
    estimate: &mut usize,
    decoded: usize,
    policy: &ComposePolicy,
) -> Result<(), ComposeError> {
    *estimate = estimate.saturating_add(encoded_estimate(decoded));
    if *estimate > policy.max_message_bytes {
        return Err(ComposeError::new(
            format!("attachments[{index}]"),
            "too_large",
            format!(
                "the message would exceed {} bytes once encoded",
                policy.max_message_bytes
            ),
        ));
    }
    Ok(())
}

/// The path relative to `base`, decided on the text alone so that a path
/// outside the directory is refused without revealing whether it exists.
fn lexically_inside(base: &Path, configured: &Path, requested: &Path) -> Option<PathBuf> {
    let relative = if requested.is_absolute() {
        requested
            .strip_prefix(base)
            .or_else(|_| requested.strip_prefix(configured))
            .ok()?
    } else {
        requested
    };
    let mut depth = 0usize;
    for component in relative.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => depth = depth.checked_sub(1)?,
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(base.join(relative))
}

fn outside(field: &str) -> ComposeError {
    ComposeError::new(
        field,
        "path_outside_attachments_dir",
        "is outside the attachments directory",
    )
}

fn io_error(field: &str, e: &io::Error) -> ComposeError {
    if e.kind() == io::ErrorKind::NotFound {
        ComposeError::new(field, "attachment_not_found", "no such file")
    } else {
        ComposeError::new(
            field,
            "attachment_unreadable",
            format!("cannot be read: {}", e.kind()),
        )
    }
}

fn not_regular(field: &str) -> ComposeError {
    ComposeError::new(
        field,
        "not_a_regular_file",
        "is not a regular file (directory, device, FIFO or socket)",
    )
}

/// Opens without blocking (a FIFO swapped in after the type check would
/// otherwise hang the open) and without following a final symlink.
#[cfg(unix)]
fn open_no_block(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(not(unix))]
fn open_no_block(path: &Path) -> io::Result<File> {
    File::open(path)
}

fn read_path(
    field: &str,
    path: &str,
    policy: &ComposePolicy,
    index: usize,
    estimate: &mut usize,
) -> Result<(String, Vec<u8>), ComposeError> {
    let Some(dir) = policy.attachments_dir.as_deref() else {
        return Err(ComposeError::new(
            field,
            "attachments_by_path_disabled",
            "attachments by path are disabled (no attachments directory is configured); \
             send the content as content_base64",
        ));
    };
    check_header_value(field, path)?;
    if path.trim().is_empty() {
        return Err(ComposeError::new(field, "invalid_path", "is empty"));
    }
    let base = fs::canonicalize(dir).map_err(|e| {
        ComposeError::new(
            field,
            "attachments_dir_unavailable",
            format!("the attachments directory cannot be opened: {}", e.kind()),
        )
    })?;
    let joined = lexically_inside(&base, dir, Path::new(path)).ok_or_else(|| outside(field))?;
    // Canonicalising resolves symlinks, so a link pointing outside is caught.
    let canonical = fs::canonicalize(&joined).map_err(|e| io_error(field, &e))?;
    if !canonical.starts_with(&base) || canonical == base {
        return Err(outside(field));
    }
    let meta = fs::symlink_metadata(&canonical).map_err(|e| io_error(field, &e))?;
    if !meta.file_type().is_file() {
        return Err(not_regular(field));
    }
    let max = policy.max_attachment_bytes;
    let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    if len > max {
        return Err(too_large(field, max));
    }
    grow_estimate(index, estimate, len, policy)?;
    let file = open_no_block(&canonical).map_err(|e| io_error(field, &e))?;
    // The path may have been replaced since the check: trust only the handle.
    let meta = file.metadata().map_err(|e| io_error(field, &e))?;
    if !meta.file_type().is_file() {
        return Err(not_regular(field));
    }
    let mut data = Vec::with_capacity(len.min(max));
    file.take(max as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| io_error(field, &e))?;
    if data.len() > max {
        return Err(too_large(field, max));
    }
    let filename = canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    check_filename(field, &filename)?;
    Ok((filename, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: Option<&Path>) -> ComposePolicy {
        ComposePolicy {
            attachments_dir: dir.map(Path::to_path_buf),
            max_attachment_bytes: 100,
            ..ComposePolicy::default()
        }
    }

    fn by_path(path: &str) -> AttachmentInput {
        AttachmentInput::Path {
            path: path.into(),
            content_type: None,
            content_id: None,
        }
    }

    fn load_one(input: &AttachmentInput, p: &ComposePolicy) -> Result<Loaded, ComposeError> {
        let mut estimate = 0;
        load(0, input, p, &mut estimate)
    }

    #[test]
    fn guesses_types() {
        assert_eq!(guess_content_type("a.PDF"), "application/pdf");
        assert_eq!(guess_content_type("photo.jpeg"), "image/jpeg");
        assert_eq!(guess_content_type("x.eml"), "message/rfc822");
        assert_eq!(guess_content_type("noext"), "application/octet-stream");
    }

    #[test]
    fn inline_padding_optional_and_whitespace_tolerated() {
        let p = policy(None);
        for b64 in ["aGk", "aGk=", "aG\r\nk="] {
            let input = AttachmentInput::Inline {
                filename: "a.txt".into(),
                content_base64: b64.into(),
                content_type: None,
                content_id: None,
            };
            let loaded = load_one(&input, &p).expect("valid");
            assert_eq!(loaded.data, b"hi");
            assert_eq!(loaded.content_type_name, "text/plain");
        }
    }

    #[test]
    fn inline_size_is_checked_before_decoding() {
        let p = policy(None);
        // Not valid base64 at all: the size rule must fire first.
        let input = AttachmentInput::Inline {
            filename: "a.bin".into(),
            content_base64: "!".repeat(1000),
            content_type: None,
            content_id: None,
        };
        let err = load_one(&input, &p).unwrap_err();
        assert_eq!(err.rule, "attachment_too_large");
        assert_eq!(err.field, "attachments[0].content_base64");
    }

    #[test]
    fn inline_exact_limit_is_accepted() {
        let p = policy(None);
        let input = AttachmentInput::Inline {
            filename: "a.bin".into(),
            content_base64: BASE64.encode([7u8; 100]),
            content_type: None,
            content_id: None,
        };
        assert_eq!(load_one(&input, &p).expect("at the limit").data.len(), 100);
        let input = AttachmentInput::Inline {
            filename: "a.bin".into(),
            content_base64: BASE64.encode([7u8; 101]),
            content_type: None,
            content_id: None,
        };
        assert_eq!(
            load_one(&input, &p).unwrap_err().rule,
            "attachment_too_large"
        );
    }

    #[test]
    fn path_rules() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("att");
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join("ok.csv"), b"a,b\n").expect("write");
        fs::write(root.path().join("secret.txt"), b"secret").expect("write");
        fs::write(dir.join("big.bin"), [0u8; 101]).expect("write");
        fs::create_dir(dir.join("sub")).expect("mkdir");
        fs::write(dir.join("sub/inner.txt"), b"in").expect("write");
        let p = policy(Some(&dir));

        let loaded = load_one(&by_path("ok.csv"), &p).expect("inside");
        assert_eq!(loaded.filename, "ok.csv");
        assert_eq!(loaded.content_type_name, "text/csv");
        assert_eq!(loaded.data, b"a,b\n");
        assert_eq!(
            load_one(&by_path("sub/../sub/inner.txt"), &p)
                .expect("inside")
                .data,
            b"in"
        );
        let abs = dir.join("ok.csv");
        assert!(load_one(&by_path(abs.to_str().expect("utf-8")), &p).is_ok());

        let rule = |path: &str| load_one(&by_path(path), &p).unwrap_err().rule;
        assert_eq!(rule("../secret.txt"), "path_outside_attachments_dir");
        assert_eq!(rule("../does-not-exist"), "path_outside_attachments_dir");
        assert_eq!(
            rule(root.path().join("secret.txt").to_str().expect("utf-8")),
            "path_outside_attachments_dir"
        );
        assert_eq!(rule("/etc/passwd"), "path_outside_attachments_dir");
        assert_eq!(rule("missing.txt"), "attachment_not_found");
        assert_eq!(rule("sub"), "not_a_regular_file");
        assert_eq!(rule("."), "path_outside_attachments_dir");
        assert_eq!(rule("big.bin"), "attachment_too_large");
        assert_eq!(rule("a\nb"), "header_injection");

        let disabled = policy(None);
        assert_eq!(
            load_one(&by_path("ok.csv"), &disabled).unwrap_err().rule,
            "attachments_by_path_disabled"
        );
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_and_fifos() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("att");
        fs::create_dir(&dir).expect("mkdir");
        fs::write(root.path().join("secret.txt"), b"secret").expect("write");
        fs::write(dir.join("real.txt"), b"real").expect("write");
        std::os::unix::fs::symlink(root.path().join("secret.txt"), dir.join("out.txt"))
            .expect("symlink");
        std::os::unix::fs::symlink(dir.join("real.txt"), dir.join("in.txt")).expect("symlink");
        let p = policy(Some(&dir));

        let rule = |path: &str| load_one(&by_path(path), &p).unwrap_err().rule;
        assert_eq!(rule("out.txt"), "path_outside_attachments_dir");
        let loaded = load_one(&by_path("in.txt"), &p).expect("link inside");
        assert_eq!(loaded.data, b"real");

        let fifo = dir.join("pipe");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
        // Would hang forever if the FIFO were opened.
        assert_eq!(rule("pipe"), "not_a_regular_file");
        assert_eq!(rule("/dev/null"), "path_outside_attachments_dir");
    }

    #[test]
    fn filename_and_type_rules() {
        let p = policy(None);
        let inline = |filename: &str, ct: Option<&str>| AttachmentInput::Inline {
            filename: filename.into(),
            content_base64: "aGk=".into(),
            content_type: ct.map(Into::into),
            content_id: None,
        };
        let rule = |input: AttachmentInput| load_one(&input, &p).unwrap_err();
        let e = rule(inline("a\r\nBcc: x@y", None));
        assert_eq!(
            (e.field.as_str(), e.rule),
            ("attachments[0].filename", "header_injection")
        );
        assert_eq!(rule(inline("", None)).rule, "invalid_filename");
        assert_eq!(rule(inline("../a.txt", None)).rule, "invalid_filename");
        for spoof in ["invoice\u{202E}fdp.exe", "a\u{2067}b.txt", "x\u{200F}.pdf"] {
            let e = rule(inline(spoof, None));
            assert_eq!(
                (e.field.as_str(), e.rule),
                ("attachments[0].filename", "invalid_filename"),
                "{spoof:?}"
            );
        }
        load_one(
            &inline("Gr\u{fc}\u{df}e \u{5e9}\u{5dc}\u{5d5}\u{5dd}.txt", None),
            &p,
        )
        .expect("right-to-left letters without controls are a name");
        let e = rule(inline("a.txt", Some("not a type")));
        assert_eq!(
            (e.field.as_str(), e.rule),
            ("attachments[0].content_type", "invalid_content_type")
        );
        assert_eq!(
            rule(inline("a.txt", Some("text/plain\r\nX: y"))).rule,
            "header_injection"
        );
        assert_eq!(
            rule(inline("a.txt", Some("multipart/mixed"))).rule,
            "invalid_content_type"
        );
        let ok = load_one(&inline("a.txt", Some("application/x-custom; v=1")), &p).expect("ok");
        assert_eq!(ok.content_type_name, "application/x-custom; v=1");
    }
}
