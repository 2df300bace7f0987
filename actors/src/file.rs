//! The `file` relay: writes each message as an `.eml` file into a folder.
//!
//! It is the embedded default when no relay is configured, so that mailmux
//! does its job on a fresh machine without an SMTP account. Files are written
//! to a temporary name and renamed, so a reader never sees half a message,
//! as a maildir delivery is: the file is made durable (fsync) before the
//! rename, and the folder after it, so that a message reported `sent`
//! survives a power loss. Files are readable by their owner only (0600):
//! they hold message bodies.

use std::path::Path;

use tokio::time::Instant;

use crate::mail::{FailureClass, Mail, Progress, Reply};
use crate::smtp::{Delivered, Failure};

/// Writes `mail` to `<dir>/<message-id>.eml`.
pub(crate) async fn deliver(
    dir: &Path,
    mail: &Mail,
    progress: &Progress,
) -> Result<Delivered, Failure> {
    let fail = |what: &str, e: std::io::Error| {
        Failure::new(
            FailureClass::RelayFault,
            format!("{what} {}: {e}", dir.display()),
        )
    };
    if Instant::now() >= mail.deadline {
        return Err(Failure::new(
            FailureClass::Busy,
            "the caller's deadline passed",
        ));
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| fail("cannot create", e))?;
    let stem = file_stem(&mail.message_id);
    let tmp = dir.join(format!(".{stem}.tmp"));
    let path = dir.join(format!("{stem}.eml"));
    if let Err(e) = write_durably(&tmp, &mail.bytes).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(fail("cannot write durably to", e));
    }
    // The rename is the delivery: record it first, as before a final ".".
    let busy = |detail: String| Failure::new(FailureClass::Busy, detail);
    match progress.commit_marked().await {
        Ok(true) => {}
        Ok(false) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(busy("the caller's deadline passed".into()));
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(busy(format!(
                "the queue could not record the delivery, so it was not written: {e}"
            )));
        }
    }
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(|e| fail("cannot rename in", e))?;
    // Renamed: delivered, unless the folder's entry is lost with the power.
    // A folder that cannot be synced leaves the message `unknown`, never
    // sent again.
    if let Err(e) = sync_dir(dir).await {
        return Err(fail("cannot make the new file durable in", e).lost());
    }
    Ok(Delivered {
        accepted: mail.to.iter().map(|a| a.to_string()).collect(),
        rejected: Vec::new(),
        deferred: Vec::new(),
        reply: Reply {
            code: 250,
            text: format!("written to {}", path.display()),
        },
        note: None,
    })
}

/// Writes `bytes` to a new file at `path` (mode 0600) and syncs it.
async fn write_durably(path: &Path, bytes: &std::sync::Arc<[u8]>) -> std::io::Result<()> {
    let (path, bytes) = (path.to_owned(), bytes.clone());
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&bytes)?;
        f.sync_all()
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// Syncs the folder `dir`, so that a rename in it is durable.
async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// A file name from a Message-ID: only characters safe in any file system.
fn file_stem(message_id: &str) -> String {
    let stem: String = message_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let stem = stem.trim_start_matches('.');
    if stem.is_empty() {
        "message".into()
    } else {
        stem.chars().take(200).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stem_is_safe() {
        assert_eq!(file_stem("abc@example.org"), "abc@example.org");
        assert_eq!(file_stem("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(file_stem(""), "message");
    }
}
