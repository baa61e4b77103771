//! A real S3-compatible server for the object-storage tests: `s3s-fs` (crates.io, the s3s
//! project's file-system backend) on 127.0.0.1 with SigV4 credentials, fixtures uploaded
//! through its API, and a TCP proxy between the daemon and the server that injects faults.
//!
//! The server binary comes from `$S3S_FS_BIN` (not an `OFFLOADD_` variable: the daemon would
//! read that as configuration), or is built once with `cargo install`
//! into the test cache (`$OFFLOADD_TEST_CACHE`, default `~/.cache/offloadd`), as
//! `tests/run.sh` does before the tests start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify};

use super::DEADLINE;

pub const VERSION: &str = "0.14.1";
pub const BUCKET: &str = "models";
pub const ACCESS_KEY: &str = "offloadd-test";
/// Never appears in any answer or log line of the daemon's (tests assert it).
pub const SECRET_KEY: &str = "s3cr3t-never-logged-7f1c";

/// The s3s-fs binary: from the environment, or installed into the cache on first use.
pub fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("S3S_FS_BIN") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("OFFLOADD_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/offloadd")
        });
    let root = cache.join(format!("s3s-fs-{VERSION}"));
    let bin = root.join("bin/s3s-fs");
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(&cache).unwrap();
    // Test binaries run at once: one installs, the others wait on the lock and find it.
    let lock = std::fs::File::create(cache.join(format!("s3s-fs-{VERSION}.lock"))).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    if !bin.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["install", "--quiet", "--locked", "--features", "binary"])
            .arg(format!("s3s-fs@{VERSION}"))
            .arg("--root")
            .arg(&root)
            .status()
            .expect("run cargo install s3s-fs");
        assert!(status.success(), "cargo install s3s-fs failed: {status}");
    }
    bin
}

/// A running s3s-fs with one bucket.
pub struct S3Server {
    pub addr: SocketAddr,
    child: std::process::Child,
    _root: tempfile::TempDir,
}

impl S3Server {
    pub async fn start() -> Self {
        let bin = tokio::task::spawn_blocking(server_binary).await.unwrap();
        let root = tempfile::tempdir().unwrap();
        // A bucket is a directory of the server's root.
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = free_port();
        let child = std::process::Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        // Ready once it accepts a connection.
        tokio::time::timeout(DEADLINE, async {
            while TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("s3s-fs listens");
        Self {
            addr,
            child,
            _root: root,
        }
    }

    /// A client of the bucket, for uploading fixtures through the API.
    pub fn client(&self) -> AmazonS3 {
        client_at(self.addr, ACCESS_KEY, SECRET_KEY)
    }

    /// Uploads a file as `key`.
    pub async fn put_file(&self, key: &str, file: &Path) {
        let data = std::fs::read(file).unwrap();
        self.put(key, data).await;
    }

    pub async fn put(&self, key: &str, data: Vec<u8>) {
        self.client()
            .put(&Key::from(key), PutPayload::from(data))
            .await
            .unwrap_or_else(|e| panic!("upload {key}: {e}"));
    }

    /// Uploads every file of a local checkpoint directory under `prefix/`.
    pub async fn put_dir(&self, prefix: &str, dir: &Path) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            self.put_file(&format!("{prefix}/{name}"), &path).await;
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client_at(addr: SocketAddr, access: &str, secret: &str) -> AmazonS3 {
    // reqwest is built without its own crypto provider (as the daemon is): ring, once.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_endpoint(format!("http://{addr}"))
        .with_region("us-east-1")
        .with_access_key_id(access)
        .with_secret_access_key(secret)
        .with_allow_http(true)
        .build()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The config lines that allow `s3://models/<prefix>` from a server at `addr`; the credentials
/// go in a file, as from a mounted Secret.
pub fn remote_config(addr: SocketAddr, prefix: &str, credentials: &Path) -> String {
    format!(
        r#"[[models.remotes]]
url = "s3://{BUCKET}/{prefix}"
credentials_file = "{}"
options = {{ aws_endpoint = "http://{addr}", aws_region = "us-east-1", allow_http = "true" }}
"#,
        credentials.display()
    )
}

pub fn write_credentials(path: &Path, access: &str, secret: &str) {
    std::fs::write(
        path,
        format!("aws_access_key_id = \"{access}\"\naws_secret_access_key = \"{secret}\"\n"),
    )
    .unwrap();
}

/// What the proxy does to connections.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Passes everything through.
    None,
    /// Closes each of the next `connections` connections after it has sent `after` bytes of
    /// the server's answer.
    DropAfter { after: u64, connections: usize },
    /// Answers the next `requests` connections with `503 Slow Down` instead of forwarding.
    ServiceUnavailable { requests: usize },
    /// Holds every answer after `after` bytes of the proxy's total until released.
    HoldAfter { after: u64 },
    /// Stops forwarding each of the next `connections` connections after it has sent `after`
    /// bytes of the server's answer, and keeps it open: a stall only a timeout ends.
    StallAfter { after: u64, connections: usize },
}

/// A TCP proxy in front of the server, counting the bytes the server sends.
pub struct Proxy {
    pub addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    /// Server-to-client bytes since the proxy started.
    pub down_bytes: Arc<AtomicU64>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    holding: Arc<Notify>,
    release: Arc<Notify>,
    released: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Self {
            addr,
            fault: Arc::new(Mutex::new(Fault::None)),
            down_bytes: Arc::default(),
            connections: Arc::default(),
            holding: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
            released: Arc::default(),
        };
        let (fault, down, conns) = (
            Arc::clone(&proxy.fault),
            Arc::clone(&proxy.down_bytes),
            Arc::clone(&proxy.connections),
        );
        let (holding, release, released) = (
            Arc::clone(&proxy.holding),
            Arc::clone(&proxy.release),
            Arc::clone(&proxy.released),
        );
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::Relaxed);
                let this = {
                    let mut f = fault.lock().await;
                    let this = f.clone();
                    match &mut *f {
                        Fault::DropAfter { connections, .. }
                        | Fault::StallAfter { connections, .. } => {
                            *connections -= 1;
                            if *connections == 0 {
                                *f = Fault::None;
                            }
                        }
                        Fault::ServiceUnavailable { requests } => {
                            *requests -= 1;
                            if *requests == 0 {
                                *f = Fault::None;
                            }
                        }
                        _ => {}
                    }
                    this
                };
                let hold = Hold {
                    holding: Arc::clone(&holding),
                    release: Arc::clone(&release),
                    released: Arc::clone(&released),
                };
                tokio::spawn(serve(client, upstream, this, Arc::clone(&down), hold));
            }
        });
        proxy
    }

    pub async fn set(&self, fault: Fault) {
        *self.fault.lock().await = fault;
    }

    /// Lets held answers go on, and holds nothing more.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.release.notify_waiters();
    }

    /// Waits until an answer is held.
    pub async fn until_holding(&self) {
        tokio::time::timeout(DEADLINE, self.holding.notified())
            .await
            .expect("the proxy holds an answer in time");
    }
}

struct Hold {
    holding: Arc<Notify>,
    release: Arc<Notify>,
    released: Arc<std::sync::atomic::AtomicBool>,
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    fault: Fault,
    down: Arc<AtomicU64>,
    hold: Hold,
) {
    if let Fault::ServiceUnavailable { .. } = fault {
        let mut buf = [0u8; 16 << 10];
        let _ = client.read(&mut buf).await;
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = client.write_all(answer.as_bytes()).await;
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
    });
    let mut sent = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match sr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut n = n;
        if let Fault::DropAfter { after, .. } = fault
            && sent + n as u64 > after
        {
            n = (after - sent) as usize;
            let _ = cw.write_all(&buf[..n]).await;
            down.fetch_add(n as u64, Ordering::Relaxed);
            break;
        }
        if let Fault::StallAfter { after, .. } = fault
            && sent + n as u64 > after
        {
            let n = (after - sent) as usize;
            let _ = cw.write_all(&buf[..n]).await;
            down.fetch_add(n as u64, Ordering::Relaxed);
            // Open and silent until the client gives up on it and closes its side, which ends
            // the upstream copy.
            let _ = up.await;
            drop(cw);
            return;
        }
        if let Fault::HoldAfter { after } = fault
            && down.load(Ordering::Relaxed) + n as u64 > after
        {
            // Made before the flag is read: a release in between still wakes it.
            let released = hold.release.notified();
            if !hold.released.load(Ordering::SeqCst) {
                hold.holding.notify_one();
                released.await;
            }
        }
        if cw.write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent += n as u64;
        down.fetch_add(n as u64, Ordering::Relaxed);
    }
    up.abort();
}
