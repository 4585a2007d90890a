//! Tests of the image cache against a tiny HTTP server on 127.0.0.1 (no other network).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;

use super::*;
use crate::images::BootKind;

/// Serves `body` at `/disk.img` (404 elsewhere) and counts every request.
struct TestServer {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl TestServer {
    async fn start(body: Vec<u8>) -> TestServer {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().fallback(move |uri: Uri| {
            counter.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            async move {
                if uri.path() == "/disk.img" {
                    body.into_response()
                } else {
                    StatusCode::NOT_FOUND.into_response()
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestServer { addr, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A few MiB that do not compress or repeat, so the body arrives in many chunks.
fn payload() -> Vec<u8> {
    (0u32..3 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn cache_in(dir: &Path) -> ImageCache {
    // Ignore any proxy variables of the environment: test traffic stays on 127.0.0.1.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    ImageCache::new(dir.join("images"), dir.join("cache")).with_http_client(http)
}

fn disk_entry(disk: ImageSource, format: &str) -> ImageEntry {
    ImageEntry {
        name: "test".into(),
        version: "1".into(),
        title: "Test".into(),
        description: String::new(),
        login_user: "root".into(),
        min_disk_gib: 1,
        format: format.into(),
        disk,
        boot: BootKind::Disk,
        kernel: None,
        initrd: None,
        cmdline: None,
        cloud_init: false,
    }
}

fn url_entry(url: String, sha256: String) -> ImageEntry {
    disk_entry(ImageSource::Url { url, sha256 }, "qcow2")
}

/// Names in the cache dir (empty if it does not exist).
fn cache_listing(cache: &ImageCache) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(cache.cache_dir()) else {
        return Vec::new();
    };
    let mut names: Vec<_> = dir
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[track_caller]
fn assert_read_only(path: &Path) {
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o444, "{} has mode {mode:o}", path.display());
}

#[tokio::test]
async fn download_is_verified_and_happens_once() {
    let body = payload();
    let sha = sha256_hex(&body);
    let server = TestServer::start(body.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_in(tmp.path());
    let entry = url_entry(server.url("/disk.img"), sha.clone());

    let local = cache.ensure_local(&entry).await.unwrap();
    assert_eq!(local.disk, cache.cache_dir().join(&sha));
    assert_eq!(local.format, "qcow2");
    assert_eq!((local.kernel, local.initrd), (None, None));
    assert_eq!(std::fs::read(&local.disk).unwrap(), body);
    assert_read_only(&local.disk);
    assert_eq!(
        cache_listing(&cache),
        vec![sha.clone()],
        "no partial file is left"
    );
    assert_eq!(server.hits(), 1);

    let again = cache.ensure_local(&entry).await.unwrap();
    assert_eq!(again.disk, local.disk);
    assert_eq!(server.hits(), 1, "a cached image is not downloaded again");
}

#[tokio::test]
async fn checksum_mismatch_fails_and_leaves_nothing() {
    let body = payload();
    let server = TestServer::start(body.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_in(tmp.path());
    let wrong = "0".repeat(64);

    let err = cache
        .ensure_local(&url_entry(server.url("/disk.img"), wrong.clone()))
        .await
        .unwrap_err();
    match err {
        ImageError::ChecksumMismatch {
            url,
            expected,
            actual,
        } => {
            assert_eq!(url, server.url("/disk.img"));
            assert_eq!(expected, wrong);
            assert_eq!(actual, sha256_hex(&body));
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert_eq!(cache_listing(&cache), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_download_once() {
    let body = payload();
    let sha = sha256_hex(&body);
    let server = TestServer::start(body).await;
    let tmp = tempfile::tempdir().unwrap();
    let cache = Arc::new(cache_in(tmp.path()));
    let entry = url_entry(server.url("/disk.img"), sha.clone());

    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (cache, entry) = (cache.clone(), entry.clone());
            tokio::spawn(async move { cache.ensure_local(&entry).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(
            task.await.unwrap().unwrap().disk,
            cache.cache_dir().join(&sha)
        );
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn restart_reverifies_the_cached_file_without_downloading() {
    let body = payload();
    let sha = sha256_hex(&body);
    let server = TestServer::start(body).await;
    let tmp = tempfile::tempdir().unwrap();
    let entry = url_entry(server.url("/disk.img"), sha);
    cache_in(tmp.path()).ensure_local(&entry).await.unwrap();

    // A new ImageCache stands for a new process: it hashes the file instead of downloading.
    cache_in(tmp.path()).ensure_local(&entry).await.unwrap();
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn corrupt_cached_file_is_downloaded_again() {
    let body = payload();
    let sha = sha256_hex(&body);
    let server = TestServer::start(body.clone()).await;
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_in(tmp.path());
    std::fs::create_dir_all(cache.cache_dir()).unwrap();
    std::fs::write(cache.cache_dir().join(&sha), &body[..1000]).unwrap();

    let local = cache
        .ensure_local(&url_entry(server.url("/disk.img"), sha))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&local.disk).unwrap(), body);
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn http_error_status_fails_and_leaves_nothing() {
    let server = TestServer::start(payload()).await;
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_in(tmp.path());
    let err = cache
        .ensure_local(&url_entry(server.url("/gone.img"), "a".repeat(64)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::HttpStatus { status: 404, .. }),
        "{err:?}"
    );
    assert_eq!(cache_listing(&cache), Vec::<String>::new());
}

#[tokio::test]
async fn unreachable_server_is_a_download_error() {
    // Bind and drop a listener to get a local port that refuses connections.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_in(tmp.path());
    let err = cache
        .ensure_local(&url_entry(
            format!("http://{addr}/disk.img"),
            "a".repeat(64),
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Download { .. }), "{err:?}");
}

#[tokio::test]
async fn path_sources_resolve_against_the_image_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_in(tmp.path());
    let image_dir = tmp.path().join("images");
    std::fs::create_dir_all(image_dir.join("deb")).unwrap();
    for f in ["deb/disk.qcow2", "deb/vmlinuz"] {
        std::fs::write(image_dir.join(f), b"x").unwrap();
    }
    let initrd = tmp.path().join("elsewhere-initrd.img");
    std::fs::write(&initrd, b"x").unwrap();
    let mut entry = disk_entry(ImageSource::Path("deb/disk.qcow2".into()), "qcow2");
    entry.boot = BootKind::Kernel;
    entry.kernel = Some(ImageSource::Path("deb/vmlinuz".into()));
    entry.initrd = Some(ImageSource::Path(initrd.clone()));

    let local = cache.ensure_local(&entry).await.unwrap();
    assert_eq!(local.disk, image_dir.join("deb/disk.qcow2"));
    assert_eq!(local.kernel, Some(image_dir.join("deb/vmlinuz")));
    assert_eq!(
        local.initrd,
        Some(initrd),
        "absolute paths are used as they are"
    );
    // Files of the build script are not the cache's to change.
    assert_ne!(
        std::fs::metadata(&local.disk).unwrap().permissions().mode() & 0o777,
        0o444
    );
}

#[tokio::test]
async fn path_sources_resolve_symlinks_to_the_build_they_point_at() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_in(tmp.path());
    let image_dir = tmp.path().join("images");
    std::fs::create_dir_all(image_dir.join("deb@v1")).unwrap();
    std::fs::write(image_dir.join("deb@v1/disk.qcow2"), b"x").unwrap();
    std::os::unix::fs::symlink("deb@v1", image_dir.join("deb")).unwrap();
    let entry = disk_entry(ImageSource::Path("deb/disk.qcow2".into()), "qcow2");

    let local = cache.ensure_local(&entry).await.unwrap();
    let build = std::fs::canonicalize(image_dir.join("deb@v1")).unwrap();
    assert_eq!(local.disk, build.join("disk.qcow2"));
}

#[tokio::test]
async fn missing_path_source_names_the_path_and_the_build_script() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_in(tmp.path());
    let entry = disk_entry(
        ImageSource::Path("debian12-cloud/disk.qcow2".into()),
        "qcow2",
    );
    let err = cache.ensure_local(&entry).await.unwrap_err();
    let expected = tmp.path().join("images/debian12-cloud/disk.qcow2");
    assert!(
        matches!(err, ImageError::MissingFile { ref path } if *path == expected),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&expected.display().to_string()) && msg.contains("images/build-images.sh"),
        "{msg}"
    );
}

#[tokio::test]
async fn directory_is_not_an_image_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_in(tmp.path());
    std::fs::create_dir_all(tmp.path().join("images/adir")).unwrap();
    let err = cache
        .ensure_local(&disk_entry(ImageSource::Path("adir".into()), "raw"))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotAFile { .. }), "{err:?}");
}

#[tokio::test]
async fn blank_disk_is_created_once_zeroed_and_read_only() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_in(tmp.path());
    let entry = disk_entry(ImageSource::Blank, "raw");

    let local = cache.ensure_local(&entry).await.unwrap();
    assert_eq!(local.disk, cache.cache_dir().join("blank-1g.raw"));
    assert_eq!(local.format, "raw");
    let meta = std::fs::metadata(&local.disk).unwrap();
    assert_eq!(meta.len(), GIB);
    assert_read_only(&local.disk);
    let mut head = vec![1u8; 4096];
    std::io::Read::read_exact(&mut std::fs::File::open(&local.disk).unwrap(), &mut head).unwrap();
    assert!(head.iter().all(|&b| b == 0));

    let modified = meta.modified().unwrap();
    cache_in(tmp.path()).ensure_local(&entry).await.unwrap();
    assert_eq!(
        std::fs::metadata(&local.disk).unwrap().modified().unwrap(),
        modified,
        "reused, not recreated"
    );
    assert_eq!(cache_listing(&cache), vec!["blank-1g.raw".to_owned()]);
}

#[tokio::test]
async fn invalid_entry_is_refused_before_any_io() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache_in(tmp.path());
    let entry = url_entry("http://127.0.0.1:9/x".into(), "../../etc/passwd".into());
    let err = cache.ensure_local(&entry).await.unwrap_err();
    assert!(matches!(err, ImageError::InvalidSha256 { .. }), "{err:?}");
    assert!(!cache.cache_dir().exists());
}
