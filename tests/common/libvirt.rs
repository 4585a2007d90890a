//! Helpers for the libvirt backend tests: test-driver URIs, specs, base images, events, and a
//! tiny busybox initramfs for real-QEMU boots.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;
use vmhost::backend::{Accel, BootMode, VmEvent, VmSpec};

/// Agent ID stamped into every domain the tests create.
pub const TEST_AGENT: &str = "vmhost-test";

/// Sends `tracing` output to the test harness (shown for failing tests); `RUST_LOG` filters it.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("vmhost=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A name that is unique per process and call, starting with `prefix`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let r = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}-{n}-{}", std::process::id(), &r[..8])
}

/// Writes a minimal node description and returns a `test:///` URI with a private state.
pub fn test_driver_uri(dir: &Path) -> String {
    let node = dir.join("node.xml");
    std::fs::write(
        &node,
        "<node>\n  <cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads>\
         <active>4</active><mhz>2000</mhz><model>x86_64</model></cpu>\n  \
         <memory>8388608</memory>\n</node>\n",
    )
    .expect("write node.xml");
    format!("test://{}", node.display())
}

/// Creates a raw base image of `mib` MiB with qemu-img.
pub fn make_base_image(path: &Path, mib: u64) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(format!("{mib}M"))
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A spec whose files live under `dir/jobs/<name>/`, backed by the raw image `base`.
pub fn spec(dir: &Path, name: &str, base: &Path, accel: Accel, boot: BootMode) -> VmSpec {
    let job_dir = dir.join("jobs").join(name);
    VmSpec {
        name: name.to_owned(),
        job_id: format!("pid-{}", std::process::id()),
        rank: 0,
        agent_id: TEST_AGENT.to_owned(),
        vcpus: 1,
        memory_mib: 256,
        accel,
        boot,
        base_image: base.to_path_buf(),
        base_format: "raw".to_owned(),
        overlay: job_dir.join("disk.qcow2"),
        disk_gib: 1,
        seed_path: job_dir.join("seed.img"),
        seed_image: Some(vec![0x5a; 64 * 1024]),
        console_log: job_dir.join("console.log"),
        nics: Vec::new(),
    }
}

/// Waits for the first event matching `want`, skipping others; panics after `within`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<VmEvent>,
    within: Duration,
    want: impl Fn(&VmEvent) -> bool,
) -> VmEvent {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(ev) if want(&ev) => return ev,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("event channel closed"),
            }
        }
    };
    tokio::time::timeout(within, wait)
        .await
        .unwrap_or_else(|_| panic!("no matching event within {within:?}"))
}

/// Marker the test initramfs prints on the serial console once init runs.
pub const GUEST_UP: &str = "VMHOST-GUEST-UP";

/// A kernel found on this machine and the modules directory that matches it.
pub struct HostKernel {
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

/// The newest `/boot/vmlinuz-*` (Debian's `linux-image-cloud-amd64`), with its modules.
pub fn host_kernel() -> Option<HostKernel> {
    let mut kernels: Vec<_> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            Some((version, e.path()))
        })
        .collect();
    kernels.sort();
    let (version, vmlinuz) = kernels.pop()?;
    Some(HostKernel {
        vmlinuz,
        modules: Path::new("/lib/modules").join(version),
    })
}

/// Builds an uncompressed newc initramfs: static busybox as init, which prints [`GUEST_UP`]
/// and powers off when the ACPI power button is pressed (needs the kernel's `button` and
/// `evdev` modules, taken from `modules` when present). `None` without a static busybox.
pub fn busybox_initramfs(modules: &Path) -> Option<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").ok()?;
    let mut cpio = Newc::default();
    for dir in [".", "bin", "dev", "proc", "sys", "lib", "etc", "etc/acpi"] {
        cpio.dir(dir);
    }
    cpio.file("bin/busybox", 0o755, &busybox);
    for (name, rel) in [
        ("button.ko", "kernel/drivers/acpi/button.ko"),
        ("evdev.ko", "kernel/drivers/input/evdev.ko"),
    ] {
        if let Ok(bytes) = std::fs::read(modules.join(rel)) {
            cpio.file(&format!("lib/{name}"), 0o644, &bytes);
        }
    }
    cpio.file("etc/acpid.conf", 0o644, b"PWRF off\n");
    cpio.file(
        "etc/acpi/off",
        0o755,
        b"#!/bin/busybox sh\necho VMHOST-GUEST-POWEROFF\n/bin/busybox poweroff -f\n",
    );
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         exec >/dev/console 2>&1 </dev/console\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sys /sys\n\
         for m in /lib/*.ko; do [ -e \"$m\" ] && /bin/busybox insmod \"$m\"; done\n\
         /bin/busybox acpid -c /etc/acpi -a /etc/acpid.conf -l /dev/console\n\
         echo {GUEST_UP}\n\
         while true; do /bin/busybox sleep 3600; done\n"
    );
    cpio.file("init", 0o755, init.as_bytes());
    Some(cpio.finish())
}

/// Minimal writer of the cpio "newc" format the kernel unpacks as initramfs.
#[derive(Default)]
struct Newc {
    out: Vec<u8>,
    ino: u32,
}

impl Newc {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let size = u32::try_from(data.len()).expect("initramfs entries are small");
        let namesize = u32::try_from(name.len() + 1).expect("short name");
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            self.ino, 0, 0, 0, 0, 0, 0, 0, 0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// A private, unprivileged `libvirtd` (run as `nobody`, all state under a tempdir) serving
/// libvirt's test driver over a UNIX socket, so a test can kill and restart "the daemon"
/// without touching the system one. Killed on drop.
pub struct PrivateDaemon {
    root: PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateDaemon {
    /// `Err(reason)` when this machine cannot run one (not root, no libvirtd or setpriv).
    pub fn start(root: &Path) -> Result<PrivateDaemon, String> {
        // Only root can switch to `nobody`; read the effective UID without unsafe code.
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
            .unwrap_or_default();
        if uid.split_whitespace().nth(2) != Some("0") {
            return Err("not running as root".to_owned());
        }
        for tool in ["/usr/sbin/libvirtd", "/usr/bin/setpriv"] {
            if !Path::new(tool).exists() {
                return Err(format!("{tool} is missing"));
            }
        }
        for d in ["home", "run"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        let chown = std::process::Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(root)
            .status()
            .expect("chown");
        assert!(chown.success());
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let mut d = PrivateDaemon {
            root: root.to_path_buf(),
            child: None,
        };
        d.spawn();
        Ok(d)
    }

    fn socket(&self) -> PathBuf {
        self.root.join("run/libvirt/libvirt-sock")
    }

    /// URI of the daemon's shared `test:///default` state.
    pub fn uri(&self) -> String {
        format!("test+unix:///default?socket={}", self.socket().display())
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let home = self.root.join("home");
        let child = std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .args(["libvirtd", "--timeout", "0"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", self.root.join("run"))
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn libvirtd");
        self.child = Some(child);
    }

    /// Waits until the daemon's socket exists.
    pub async fn wait_ready(&self) {
        let wait = async {
            while !self.socket().exists() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("private libvirtd did not come up");
    }

    /// Kills the daemon at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the daemon again after [`PrivateDaemon::kill`].
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Client side of an RFB 3.8 session that expects security type None (what `open_vnc`
/// promises): handshake, ClientInit (shared), then one full-screen FramebufferUpdateRequest.
/// Returns the ServerInit `(width, height, name)` once a FramebufferUpdate header arrived.
pub async fn rfb_none_handshake_and_update<S>(io: &mut S) -> (u16, u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut version = [0u8; 12];
    io.read_exact(&mut version).await.expect("server version");
    assert_eq!(&version, b"RFB 003.008\n");
    io.write_all(b"RFB 003.008\n")
        .await
        .expect("client version");

    let count = io.read_u8().await.expect("security type count");
    assert!(count > 0, "the server refused the connection");
    let mut types = vec![0u8; usize::from(count)];
    io.read_exact(&mut types).await.expect("security types");
    assert!(
        types.contains(&1),
        "security type None not offered: {types:?}"
    );
    io.write_u8(1).await.expect("choose None");
    assert_eq!(io.read_u32().await.expect("security result"), 0);

    io.write_u8(1).await.expect("ClientInit shared=1");
    let width = io.read_u16().await.expect("width");
    let height = io.read_u16().await.expect("height");
    let mut pixel_format = [0u8; 16];
    io.read_exact(&mut pixel_format)
        .await
        .expect("pixel format");
    let name_len = io.read_u32().await.expect("name length");
    let mut name = vec![0u8; usize::try_from(name_len).expect("small name")];
    io.read_exact(&mut name).await.expect("name");
    assert!(
        width > 0 && height > 0,
        "empty framebuffer {width}x{height}"
    );

    // FramebufferUpdateRequest: type 3, incremental 0, x 0, y 0, width, height.
    let mut request = vec![3u8, 0, 0, 0, 0, 0];
    request.extend_from_slice(&width.to_be_bytes());
    request.extend_from_slice(&height.to_be_bytes());
    io.write_all(&request).await.expect("update request");
    let message_type = io.read_u8().await.expect("server message type");
    assert_eq!(message_type, 0, "expected a FramebufferUpdate");
    let _padding = io.read_u8().await.expect("padding");
    let rects = io.read_u16().await.expect("rectangle count");
    assert!(rects > 0, "a full update has at least one rectangle");
    (width, height, String::from_utf8_lossy(&name).into_owned())
}

/// Reads from `io` until the output contains `needle`; returns everything read, or what went
/// wrong (end of stream, an error, `within` passed) with the output so far.
pub async fn read_until<S>(io: &mut S, needle: &str, within: Duration) -> Result<String, String>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;

    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = io.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("console ended before {needle:?}"));
            }
            out.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&out).contains(needle) {
                return Ok(());
            }
        }
    };
    let result = tokio::time::timeout(within, read)
        .await
        .unwrap_or_else(|_| Err(format!("no {needle:?} within {within:?}")));
    let text = String::from_utf8_lossy(&out).into_owned();
    match result {
        Ok(()) => Ok(text),
        Err(e) => Err(format!("{e}: {text}")),
    }
}

/// Reads and discards until `io` ends (EOF or a reset); panics after `within`.
pub async fn wait_closed<S>(io: &mut S, within: Duration)
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;

    let drain = async {
        let mut buf = [0u8; 4096];
        while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::time::timeout(within, drain)
        .await
        .unwrap_or_else(|_| panic!("stream still open after {within:?}"));
}

/// Threads of this process whose name is `name` (from `/proc/self/task/*/comm`).
pub fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .count()
}
