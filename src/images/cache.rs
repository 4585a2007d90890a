//! The image cache: turns a catalog entry into local files a VM can boot from.
//!
//! [`ImageCache::ensure_local`] resolves every source of an entry:
//! - `path` sources are checked, never copied or modified: they belong to `images/build-images.sh`.
//!   They are returned with symlinks resolved: the build script publishes a new build by
//!   re-pointing `debian12-cloud -> debian12-cloud@<recipe>`, and an overlay records its backing
//!   file by path, so an overlay must name the immutable build it was made from, never the link;
//! - `url` sources are downloaded once into the cache dir, under their sha256 as the file name.
//!   The body streams into a `.<sha>.<uuid>.part` file in the same dir while it is hashed; only
//!   a verified, fsynced file is renamed into place, so a file under a hash name is always
//!   complete. A mismatch or a cancelled download deletes the partial file;
//! - `blank` disks are created as sparse all-zero raw files `blank-<N>g.raw`. A sparse file of
//!   N GiB is byte for byte what `qemu-img create -f raw` makes, so no subprocess is needed.
//!
//! Trust: a file already under a hash name is re-hashed the first time this process needs it,
//! and trusted for the rest of the process. Hashing a few GiB costs seconds once per start,
//! which buys detection of a truncated or bit-rotted base before any VM boots from it; a file
//! that fails the check is deleted and downloaded again. Blank disks are trusted by their size:
//! nothing writes to them, and zeroes cannot be verified faster than they can be recreated.
//!
//! Files the cache creates are made read-only (0444) before they are published: base images are
//! never written after they are in place, every VM writes into its own overlay.
//!
//! Concurrency: one async lock per cache file serialises the check-download-publish sequence,
//! so concurrent `ensure_local` calls for the same image download it once and the later callers
//! find it verified. Separate vmhost processes sharing a cache dir stay correct (unique temp
//! names, atomic rename) but may download twice. Partial files of a killed process are left
//! behind; they are dot-files that are never read.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::{ImageEntry, ImageError, ImageSource};

/// Bytes in a GiB; blank disk sizes are whole GiB.
const GIB: u64 = 1 << 30;
/// Mode of every file the cache publishes.
const READ_ONLY: u32 = 0o444;
/// A base image server that does not answer within this is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A download that stalls this long is dead. There is no total timeout: images are large and
/// links slow, and a slow but moving download should finish.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The files one image boots from, all present on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// Read-only base disk for the VM's overlay.
    pub disk: PathBuf,
    /// Format of `disk` as `qemu-img` names it.
    pub format: String,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

/// Downloads, verifies and creates base images. See the module docs.
#[derive(Debug)]
pub struct ImageCache {
    /// Where `path` sources live (built by `images/build-images.sh`).
    image_dir: PathBuf,
    /// Where downloads and blank disks go; created on first use.
    cache_dir: PathBuf,
    http: reqwest::Client,
    /// One lock per cache file name. Holding a slot's lock across the awaits of a download is
    /// what makes it happen once. The outer std mutex is held only to find or insert a slot,
    /// never across an await. Slots are never removed: a catalog has a handful of files.
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

/// What this process knows about one cache file.
#[derive(Debug, Default)]
struct Slot {
    /// The file was hashed or created by this process and can be trusted without re-checking.
    verified: bool,
}

impl ImageCache {
    pub fn new(image_dir: PathBuf, cache_dir: PathBuf) -> ImageCache {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("vmhost/", env!("CARGO_PKG_VERSION")))
            .build()
            // Same failure mode as `reqwest::Client::new()`: only a broken TLS backend fails here.
            .expect("the HTTP client configuration is valid");
        ImageCache {
            image_dir,
            cache_dir,
            http,
            slots: Mutex::default(),
        }
    }

    /// Replaces the HTTP client, e.g. to set a proxy or, in tests, to ignore proxy variables.
    pub fn with_http_client(mut self, http: reqwest::Client) -> ImageCache {
        self.http = http;
        self
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Makes every file of `entry` available locally and returns their paths. Idempotent; the
    /// first call for a `url` source downloads it, later calls only check it is still there.
    #[tracing::instrument(skip_all, fields(image = %entry.label()))]
    pub async fn ensure_local(&self, entry: &ImageEntry) -> Result<LocalImage, ImageError> {
        // Entries from a parsed catalog are valid already; one built in code must not smuggle,
        // say, a sha256 of "../x" into a file name.
        entry.validate()?;
        let blank_gib = entry.min_disk_gib;
        let disk = self.ensure_source(&entry.disk, blank_gib).await?;
        let kernel = match &entry.kernel {
            Some(source) => Some(self.ensure_source(source, blank_gib).await?),
            None => None,
        };
        let initrd = match &entry.initrd {
            Some(source) => Some(self.ensure_source(source, blank_gib).await?),
            None => None,
        };
        debug!(disk = %disk.display(), "image is local");
        Ok(LocalImage {
            disk,
            format: entry.format.clone(),
            kernel,
            initrd,
        })
    }

    async fn ensure_source(
        &self,
        source: &ImageSource,
        blank_gib: u64,
    ) -> Result<PathBuf, ImageError> {
        match source {
            ImageSource::Path(path) => self.ensure_path(path).await,
            ImageSource::Url { url, sha256 } => {
                self.ensure_download(url, &sha256.to_ascii_lowercase())
                    .await
            }
            ImageSource::Blank => self.ensure_blank(blank_gib).await,
        }
    }

    async fn ensure_path(&self, path: &Path) -> Result<PathBuf, ImageError> {
        let path = self.image_dir.join(path); // `join` keeps an absolute `path` as it is.
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => tokio::fs::canonicalize(&path)
                .await
                .map_err(io_at("resolve", &path)),
            Ok(_) => Err(ImageError::NotAFile { path }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Err(ImageError::MissingFile { path })
            }
            Err(err) => Err(io_at("inspect", &path)(err)),
        }
    }

    async fn ensure_download(&self, url: &str, sha256: &str) -> Result<PathBuf, ImageError> {
        let dest = self.cache_dir.join(sha256);
        let slot = self.slot(sha256);
        let mut slot = slot.lock().await;
        let present = file_exists(&dest).await?;
        if slot.verified && present {
            return Ok(dest);
        }
        if present {
            let actual = hash_file(dest.clone()).await?;
            if actual == sha256 {
                info!(path = %dest.display(), "verified cached image");
                slot.verified = true;
                return Ok(dest);
            }
            warn!(
                path = %dest.display(), expected = sha256, actual,
                "cached image is corrupt, downloading it again"
            );
            remove_file(&dest).await?;
        }
        self.download(url, sha256, &dest).await?;
        slot.verified = true;
        Ok(dest)
    }

    async fn download(&self, url: &str, sha256: &str, dest: &Path) -> Result<(), ImageError> {
        let started = Instant::now();
        info!(url, "downloading image");
        let download_err = |err| ImageError::Download {
            url: url.to_owned(),
            err,
        };
        let mut response = self.http.get(url).send().await.map_err(download_err)?;
        if !response.status().is_success() {
            return Err(ImageError::HttpStatus {
                url: url.to_owned(),
                status: response.status().as_u16(),
            });
        }
        self.create_cache_dir().await?;
        let part = PartialFile::new(
            self.cache_dir
                .join(format!(".{sha256}.{}.part", uuid::Uuid::new_v4())),
        );
        let mut file = tokio::fs::File::create(&part.path)
            .await
            .map_err(io_at("create", &part.path))?;
        let mut hasher = Sha256::new();
        let mut bytes: u64 = 0;
        while let Some(chunk) = response.chunk().await.map_err(download_err)? {
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(io_at("write", &part.path))?;
            bytes += chunk.len() as u64;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            // `part` is dropped on return and deletes the bytes we must not keep.
            return Err(ImageError::ChecksumMismatch {
                url: url.to_owned(),
                expected: sha256.to_owned(),
                actual,
            });
        }
        file.flush().await.map_err(io_at("write", &part.path))?;
        file.sync_all().await.map_err(io_at("fsync", &part.path))?;
        drop(file);
        self.publish(part, dest).await?;
        info!(
            url, path = %dest.display(), bytes, elapsed_ms = started.elapsed().as_millis(),
            "downloaded image"
        );
        Ok(())
    }

    async fn ensure_blank(&self, gib: u64) -> Result<PathBuf, ImageError> {
        let name = format!("blank-{gib}g.raw");
        let dest = self.cache_dir.join(&name);
        let slot = self.slot(&name);
        let mut slot = slot.lock().await;
        // `validate` caps min_disk_gib, so this cannot overflow.
        let size = gib * GIB;
        match tokio::fs::metadata(&dest).await {
            Ok(meta) if meta.is_file() && meta.len() == size => {
                slot.verified = true;
                return Ok(dest);
            }
            Ok(meta) => {
                warn!(
                    path = %dest.display(), len = meta.len(), expected = size,
                    "blank disk has the wrong size, recreating it"
                );
                remove_file(&dest).await?;
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_at("inspect", &dest)(err)),
        }
        self.create_cache_dir().await?;
        let part = PartialFile::new(
            self.cache_dir
                .join(format!(".{name}.{}.part", uuid::Uuid::new_v4())),
        );
        let file = tokio::fs::File::create(&part.path)
            .await
            .map_err(io_at("create", &part.path))?;
        // Extending a file leaves a hole: no data blocks are written, reads return zeroes.
        file.set_len(size)
            .await
            .map_err(io_at("extend", &part.path))?;
        file.sync_all().await.map_err(io_at("fsync", &part.path))?;
        drop(file);
        self.publish(part, &dest).await?;
        info!(path = %dest.display(), gib, "created blank base disk");
        slot.verified = true;
        Ok(dest)
    }

    /// Makes a complete partial file read-only and renames it to `dest`, durably.
    async fn publish(&self, part: PartialFile, dest: &Path) -> Result<(), ImageError> {
        let path = part.path.clone();
        tokio::fs::set_permissions(&path, std::fs::Permissions::from_mode(READ_ONLY))
            .await
            .map_err(io_at("make read-only", &path))?;
        tokio::fs::rename(&path, dest)
            .await
            .map_err(io_at("rename", &path))?;
        part.keep();
        // The rename is durable only once the directory entry is on disk.
        let dir = self.cache_dir.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir).and_then(|d| d.sync_all()))
            .await
            .unwrap_or_else(|join| Err(join.into()))
            .map_err(io_at("fsync", &self.cache_dir))
    }

    async fn create_cache_dir(&self) -> Result<(), ImageError> {
        tokio::fs::create_dir_all(&self.cache_dir)
            .await
            .map_err(|err| ImageError::Io {
                op: "create",
                path: self.cache_dir.clone(),
                err,
            })
    }

    fn slot(&self, key: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        // A poisoned map is still a valid map: the only operation under the lock is an insert.
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slots.entry(key.to_owned()).or_default().clone()
    }
}

/// A file being written in the cache dir; deleted on drop unless [`PartialFile::keep`] was
/// called. Dropping covers every early return and a cancelled `ensure_local` future.
#[derive(Debug)]
struct PartialFile {
    path: PathBuf,
    keep: bool,
}

impl PartialFile {
    fn new(path: PathBuf) -> PartialFile {
        PartialFile { path, keep: false }
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: a leftover dot-file is harmless, and drop cannot report an error.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// For `map_err`: an `io::Error` of `op` on `path` as [`ImageError::Io`].
fn io_at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |err| ImageError::Io {
        op,
        path: path.to_owned(),
        err,
    }
}

async fn file_exists(path: &Path) -> Result<bool, ImageError> {
    match tokio::fs::metadata(path).await {
        Ok(meta) => Ok(meta.is_file()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(ImageError::Io {
            op: "inspect",
            path: path.to_owned(),
            err,
        }),
    }
}

async fn remove_file(path: &Path) -> Result<(), ImageError> {
    tokio::fs::remove_file(path)
        .await
        .map_err(|err| ImageError::Io {
            op: "remove",
            path: path.to_owned(),
            err,
        })
}

/// Lowercase hex sha256 of a file, computed on the blocking pool (it reads the whole file).
async fn hash_file(path: PathBuf) -> Result<String, ImageError> {
    let task_path = path.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut file = std::fs::File::open(&task_path)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .unwrap_or_else(|join| Err(join.into()))
    .map_err(io_at("hash", &path))
}

#[cfg(test)]
mod tests;
