//! Connecting to a daemon, for the reference worker, tests and tools.
//!
//! Over a Unix socket the HTTP/2 `:authority` must be a host name: h2, under tonic, rejects a
//! socket path there (grpcurl < 1.9 and grpcio send one). We always send `localhost`.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::offload_client::OffloadClient;

/// Opens a channel to the daemon's Unix socket.
pub async fn connect_uds(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// Opens a channel to a TCP address such as `127.0.0.1:50051`.
pub async fn connect_tcp(addr: std::net::SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await
}

/// What a TLS client trusts and shows: PEM files.
#[derive(Debug, Clone)]
pub struct TlsClientFiles {
    /// CA certificates the daemon's certificate must chain to.
    pub ca: PathBuf,
    /// Client certificate chain and key, for a daemon that asks for them (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Opens a TLS channel to a TCP address; `server_name` is what the daemon's certificate must
/// name (e.g. `localhost`, or the Service's DNS name).
pub async fn connect_tls(
    addr: std::net::SocketAddr,
    server_name: &str,
    files: &TlsClientFiles,
) -> Result<Channel, Box<dyn std::error::Error + Send + Sync>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};

    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&files.ca)? {
        roots.add(c?)?;
    }
    let builder = ClientConfig::builder_with_provider(crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match &files.identity {
        Some((cert, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_file(key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = ServerName::try_from(server_name.to_string())?;
    Ok(Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, name) = (connector.clone(), name.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?)
}

/// A typed client over either kind of channel, accepting answers as large as the daemon sends
/// (tensor tables of 100k-tensor checkpoints are over gRPC's default 4 MiB).
pub fn offload(channel: Channel) -> OffloadClient<Channel> {
    OffloadClient::new(channel)
        .max_decoding_message_size(crate::proto::MAX_RESPONSE_BYTES)
        .max_encoding_message_size(crate::proto::MAX_REQUEST_BYTES)
}
