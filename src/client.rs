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

/// A typed client over either kind of channel, accepting answers as large as the daemon sends
/// (tensor tables of 100k-tensor checkpoints are over gRPC's default 4 MiB).
pub fn offload(channel: Channel) -> OffloadClient<Channel> {
    OffloadClient::new(channel)
        .max_decoding_message_size(crate::proto::MAX_RESPONSE_BYTES)
        .max_encoding_message_size(crate::proto::MAX_REQUEST_BYTES)
}
