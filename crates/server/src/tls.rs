//! TLS on the numstream port: the server's certificate, key and optional
//! client CA (mTLS) loaded from PEM files and reloadable while serving, and
//! the handshake each accepted connection goes through before its first
//! frame.
//!
//! The frames inside TLS are exactly those of plain TCP; TLS only changes
//! the byte stream they travel on (ALPN `numstream/1`, TLS 1.3 only).
//! Everything before a connection's hello, the TLS handshake included,
//! runs against the same handshake deadline and holds the same
//! per-address handshake slot, so a peer that opens TCP and never finishes
//! TLS is gone after `--handshake-timeout` like one that never sends OPEN.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use numstream_protocol::{ErrorCode, ErrorFrame, Frame, encode_frame};

use crate::connection::{self, Admission, Shared};
use crate::telemetry::HandshakeFailure;

/// A peer that offers ALPN without [`ALPN_NUMSTREAM`] is refused by the
/// TLS stack (`no_application_protocol`); one that offers none is refused
/// after the handshake.
pub use numstream_protocol::ALPN_NUMSTREAM;

/// A TLS record of type handshake starts with this byte. A numstream
/// frame starts with the high byte of its u32 length, 0x00 (frames are at
/// most 512 bytes), so one byte tells TLS from plaintext numstream.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Time allowed to tell a plaintext client that the port wants TLS.
const PLAINTEXT_ANSWER_TIME: Duration = Duration::from_millis(500);

/// Where the server's TLS material lives, as given on the command line;
/// read again on every [`ServerTls::reload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to; `None`
    /// accepts clients without certificates.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS material could not be loaded. Names the file and the problem,
/// never the file's contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} is not a PEM file of certificates: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    BadKey { path: PathBuf },
    #[error("{} cannot verify client certificates: {reason}", path.display())]
    BadClientCa { path: PathBuf, reason: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(rustls::Error),
}

/// The server's TLS configuration, swapped whole on reload: a handshake
/// uses the configuration current when it starts, and connections already
/// established keep theirs, so reloading drops nothing.
pub struct ServerTls {
    files: TlsFiles,
    /// Read once per accepted connection, written on reload; never held
    /// across an `.await`.
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the files; fails on anything missing or unusable, so a
    /// misconfigured server does not start.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = build_config(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again and, if they make a valid configuration,
    /// serves new connections with it. On error the previous configuration
    /// stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(build_config(&self.files)?);
        match self.current.write() {
            Ok(mut current) => *current = config,
            // A writer panicked mid-assignment: the value is still whole.
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        Ok(())
    }

    /// The files this configuration is read from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        TlsAcceptor::from(config)
    }
}

fn build_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates(&files.cert)?;
    let key = private_key(&files.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in certificates(path)? {
                roots
                    .add(certificate)
                    .map_err(|error| TlsError::BadClientCa {
                        path: path.clone(),
                        reason: error.to_string(),
                    })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|error| TlsError::BadClientCa {
                path: path.clone(),
                reason: error.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![ALPN_NUMSTREAM.to_vec()];
    Ok(config)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

/// Every certificate in a PEM file, in order.
pub(crate) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    // The parser's own message may quote a line of the file: not for a key.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::BadKey {
        path: path.to_owned(),
    })
}

/// Serves one accepted connection on a TLS port: the TLS handshake, then
/// the connection as on plain TCP. A plaintext hello is answered with a
/// plaintext `malformed` ERROR that says the port wants TLS, so such a
/// client fails at once with the reason instead of waiting for a WELCOME.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    admission: Admission,
    tls: Arc<ServerTls>,
) {
    let deadline = admission.handshake_deadline;
    let peer_key = crate::peers::PeerKey::from(peer.ip());
    let shutdown = shared.shutdown.clone();
    // Boxed: the handshake's state (a whole rustls connection) is needed
    // once, and would otherwise size this task for its whole life.
    let handshake = Box::pin(timeout_at(deadline, handshake(stream, &tls)));
    let outcome = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            shared.handshake_failed(HandshakeFailure::ShuttingDown, peer_key);
            return;
        }
        outcome = handshake => outcome,
    };
    let failure = match outcome {
        Ok(Ok(stream)) => return connection::serve(stream, peer, shared, admission).await,
        Ok(Err(Refusal::Plaintext(stream))) => {
            debug!(%peer, "plaintext on the TLS port; telling the client");
            shared.telemetry.rejected(ErrorCode::Malformed);
            let error = ErrorFrame::new(
                ErrorCode::Malformed,
                "this port speaks numstream over TLS only: connect with TLS \
                 (numstream-client --tls)",
            );
            Box::pin(answer_plaintext(stream, error)).await;
            HandshakeFailure::NotTls
        }
        Ok(Err(Refusal::Closed)) => HandshakeFailure::Closed,
        Ok(Err(Refusal::Failed(error))) => {
            debug!(%peer, %error, "TLS handshake failed");
            HandshakeFailure::Tls
        }
        Err(_elapsed) => {
            debug!(%peer, "TLS handshake not done within the handshake timeout");
            HandshakeFailure::Timeout
        }
    };
    shared.handshake_failed(failure, peer_key);
}

/// Why a connection did not become a TLS stream.
enum Refusal {
    /// It spoke first, and not TLS.
    Plaintext(TcpStream),
    /// It closed before saying anything.
    Closed,
    /// The TLS handshake failed (or the peer did not agree on ALPN).
    Failed(std::io::Error),
}

async fn handshake(
    stream: TcpStream,
    tls: &ServerTls,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, Refusal> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(0) => return Err(Refusal::Closed),
        Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => return Err(Refusal::Plaintext(stream)),
        Ok(_) => {}
        Err(error) => return Err(Refusal::Failed(error)),
    }
    let stream = tls
        .acceptor()
        .accept(stream)
        .await
        .map_err(Refusal::Failed)?;
    if stream.get_ref().1.alpn_protocol() != Some(ALPN_NUMSTREAM) {
        return Err(Refusal::Failed(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the client did not offer ALPN numstream/1",
        )));
    }
    Ok(stream)
}

/// Reads the hello the client already sent (so closing does not reset the
/// connection and destroy the answer), writes `error`, half-closes and
/// lingers briefly for the client to read it; all within a short bound.
async fn answer_plaintext(mut stream: TcpStream, error: ErrorFrame) {
    let mut buf = bytes::BytesMut::new();
    encode_frame(&Frame::Error(error), &mut buf);
    let _ = tokio::time::timeout(PLAINTEXT_ANSWER_TIME, async {
        let mut scratch = [0u8; 512];
        while let Ok(read) = stream.try_read(&mut scratch) {
            if read == 0 {
                break;
            }
        }
        stream.write_all(&buf).await?;
        stream.shutdown().await?;
        while stream.read(&mut scratch).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}
