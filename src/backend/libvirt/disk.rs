//! Host files of a VM: the qcow2 overlay (made with `qemu-img`), the seed image, their parent
//! directories, and removal.
//!
//! Nothing here talks to libvirt. All I/O is async (`tokio::fs`, `tokio::process`).
//!
//! Permissions: QEMU runs as `libvirt-qemu` on Debian. With `dynamic_ownership = 1` (the
//! default) libvirt chowns the disks, kernel and initrd to that user while the domain runs (and
//! leaves read-only images and backing files chowned afterwards), but it does not touch parent
//! directories: every ancestor of those files must be traversable (`o+x`) by the QEMU user.
//! [`untraversable_ancestors`] reports the ones that are not, and the backend logs them as a
//! warning. The console log is written by `virtlogd`, which runs as root.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

/// Creates the missing ancestors of `file` (mode 0755) and returns them, outermost first, so a
/// failed caller can remove exactly what it created.
pub(super) async fn create_parent_dirs(file: &Path) -> io::Result<Vec<PathBuf>> {
    let Some(parent) = file.parent() else {
        return Ok(Vec::new());
    };
    let mut missing = Vec::new();
    let mut dir = Some(parent);
    while let Some(d) = dir {
        if d.as_os_str().is_empty() || tokio::fs::try_exists(d).await? {
            break;
        }
        missing.push(d.to_path_buf());
        dir = d.parent();
    }
    missing.reverse();
    let mut created = Vec::new();
    for d in missing {
        let mut b = tokio::fs::DirBuilder::new();
        b.mode(0o755);
        match b.create(&d).await {
            Ok(()) => created.push(d),
            // A concurrent caller made it first: not ours to remove.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

/// Removes directories created by [`create_parent_dirs`] if they are empty (innermost first).
pub(super) async fn remove_created_dirs(created: &[PathBuf]) {
    for d in created.iter().rev() {
        // Fails harmlessly when someone else put a file there meanwhile.
        let _ = tokio::fs::remove_dir(d).await;
    }
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, then rename), mode 0644.
pub(super) async fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    let tmp = path.with_file_name(tmp_name);
    let result = async {
        let mut f = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .await?;
        f.write_all(bytes).await?;
        f.sync_all().await?;
        drop(f);
        // The umask may have narrowed the mode given to open().
        tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).await?;
        tokio::fs::rename(&tmp, path).await
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

/// Deletes `path`; a missing file is success.
pub(super) async fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A failed `qemu-img` run.
#[derive(Debug, thiserror::Error)]
pub(super) enum QemuImgError {
    #[error("failed to run qemu-img")]
    Spawn(#[source] io::Error),
    #[error("qemu-img {args} exited with {status}: {stderr}")]
    Failed {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("qemu-img info printed unexpected output")]
    Json(#[source] serde_json::Error),
}

async fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, QemuImgError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(QemuImgError::Spawn)?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    Err(QemuImgError::Failed {
        args: args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Creates `overlay` as a qcow2 image of `size_gib` GiB backed by `base` (of format `base_format`).
pub(super) async fn create_overlay(
    overlay: &Path,
    base: &Path,
    base_format: &str,
    size_gib: u64,
) -> Result<(), QemuImgError> {
    let size = format!("{size_gib}G");
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        base_format.as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        overlay.as_os_str(),
        size.as_ref(),
    ])
    .await
    .map(drop)
}

/// Whether the existing `overlay` is a qcow2 image backed by `base` in `base_format`.
/// An unreadable or corrupt image is simply not a match.
pub(super) async fn overlay_matches(
    overlay: &Path,
    base: &Path,
    base_format: &str,
) -> Result<bool, QemuImgError> {
    #[derive(serde::Deserialize)]
    struct Info {
        format: String,
        #[serde(rename = "backing-filename")]
        backing: Option<String>,
        #[serde(rename = "backing-filename-format")]
        backing_format: Option<String>,
    }
    // -U: do not take the image lock, so this works even if some QEMU holds it.
    let out = match qemu_img(&[
        "info".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
        overlay.as_os_str(),
    ])
    .await
    {
        Ok(out) => out,
        Err(QemuImgError::Failed { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    let info: Info = serde_json::from_slice(&out).map_err(QemuImgError::Json)?;
    Ok(info.format == "qcow2"
        && info.backing.as_deref().map(Path::new) == Some(base)
        && info.backing_format.as_deref() == Some(base_format))
}

/// Ancestors of `file` that the QEMU user cannot traverse (no `o+x`), nearest last.
pub(super) fn untraversable_ancestors(file: &Path) -> Vec<PathBuf> {
    file.ancestors()
        .skip(1)
        .filter(|d| !d.as_os_str().is_empty())
        .filter(|d| {
            std::fs::metadata(d)
                .map(|m| m.permissions().mode() & 0o001 == 0)
                .unwrap_or(false)
        })
        .map(Path::to_path_buf)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_atomic_replaces_content_with_mode_0644_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("seed.img");
        write_atomic(&p, b"one").await.expect("first write");
        write_atomic(&p, b"two").await.expect("second write");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(names.len(), 1);
    }

    #[tokio::test]
    async fn create_parent_dirs_reports_only_new_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a/b/c/file");
        let created = create_parent_dirs(&file).await.expect("mkdir");
        assert_eq!(
            created,
            vec![
                dir.path().join("a"),
                dir.path().join("a/b"),
                dir.path().join("a/b/c")
            ]
        );
        assert!(create_parent_dirs(&file).await.expect("again").is_empty());
        remove_created_dirs(&created).await;
        assert!(!dir.path().join("a").exists());
    }

    #[test]
    fn untraversable_ancestors_finds_private_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let found = untraversable_ancestors(&dir.path().join("x.img"));
        assert!(found.contains(&dir.path().to_path_buf()), "{found:?}");
    }
}
