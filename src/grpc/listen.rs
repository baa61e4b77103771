//! Listeners: the Unix socket (always) and TCP (when configured).

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};

/// Mode of the control socket: the daemon's user and group (the inference containers share a
/// group with it) may connect, nobody else.
const SOCKET_MODE: u32 = 0o660;

#[derive(Debug, Error)]
pub enum ListenError {
    #[error(
        "another offloadd is already serving on {0}; stop it first or set server.uds_path to another path"
    )]
    InUse(PathBuf),
    #[error(
        "{0} exists and is not a socket; refusing to replace it; remove it or choose another server.uds_path"
    )]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Uds {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on tcp {addr}: {source}")]
    Tcp {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the Unix socket. A socket file that nobody answers on is left over from a crash and is
/// replaced; a live one means another daemon owns it, and we refuse rather than steal it.
pub fn bind_uds(path: &Path) -> Result<UnixListener, ListenError> {
    let err = |source| ListenError::Uds {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotASocket(path.to_path_buf()));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ListenError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                tracing::warn!(path = %path.display(), "replacing stale socket left by an earlier run");
                std::fs::remove_file(path).map_err(err)?;
            }
            Err(e) => return Err(err(e)),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // Bind under a temporary name and rename into place, so the socket never appears at its
    // public path with the umask's looser mode.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(listener)
}

pub async fn bind_tcp(addr: std::net::SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Tcp { addr, source })
}
