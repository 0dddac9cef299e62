//! How the client reaches a server: the [`Connector`] seam `run_with` is
//! generic over, and its real implementation [`TcpConnector`]: plain TCP,
//! or TLS over it (ALPN `numstream/1`), yielding one byte stream either
//! way for the frames, which are the same on both. Owns the TLS settings (trusted roots,
//! server name, client certificate) and the diagnosis of every TLS
//! failure: a mismatch that no retry can fix (no TLS on the other end, an
//! untrusted, expired or misnamed certificate, a refused client
//! certificate) is told apart from a connection that merely broke.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use numstream_protocol::codec::decode_frame;
use numstream_protocol::{Disposition, ErrorFrame, Frame};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::untrusted::escape;

pub use numstream_protocol::ALPN_NUMSTREAM;

/// Bytes of the server's first answer kept while the TLS handshake runs:
/// enough for any numstream frame (at most 2 + 512 bytes), so a server
/// that answers in plaintext can be quoted.
const FIRST_BYTES_KEPT: usize = 514;

/// What a TLS client trusts and presents; paths as given on the command
/// line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM CA certificates to trust instead of the platform's roots.
    pub ca: Option<PathBuf>,
    /// Name to verify the server's certificate against; default: the host
    /// connected to.
    pub server_name: Option<String>,
    /// PEM certificate chain and key to present (mutual TLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Why TLS settings could not be made. Names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    BadKey { path: PathBuf },
    #[error("{} holds a certificate that cannot be trusted: {reason}", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("the platform has no trusted root certificates; give --tls-ca")]
    NoRoots,
    #[error("a client certificate needs both --tls-client-cert and --tls-client-key")]
    HalfIdentity,
    #[error("{0:?} is not a valid TLS server name")]
    BadServerName(String),
    #[error("the TLS configuration is unusable: {0}")]
    Config(rustls::Error),
}

/// Ready-made TLS client settings: cheap to clone, shared by every
/// connection of a run (and by every client of a load generator).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Two settings are the same if they share one configuration.
impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl ClientTls {
    /// Reads the files `options` names and builds the settings: TLS 1.3,
    /// ALPN `numstream/1`, the `ring` provider.
    pub fn new(options: &TlsOptions) -> Result<Self, TlsSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        match &options.ca {
            Some(path) => {
                for certificate in certificates(path)? {
                    roots
                        .add(certificate)
                        .map_err(|error| TlsSetupError::BadCa {
                            path: path.clone(),
                            reason: error.to_string(),
                        })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for error in &native.errors {
                    tracing::debug!(%error, "cannot load some of the platform's root certificates");
                }
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err(TlsSetupError::NoRoots);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsSetupError::Config)?
            .with_root_certificates(roots);
        let mut config = match (&options.client_cert, &options.client_key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(certificates(cert)?, private_key(key)?)
                .map_err(TlsSetupError::Config)?,
            _ => return Err(TlsSetupError::HalfIdentity),
        };
        config.alpn_protocols = vec![ALPN_NUMSTREAM.to_vec()];
        let server_name = match &options.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|_| TlsSetupError::BadServerName(name.clone()))?,
            ),
            None => None,
        };
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The name the certificate must carry when connecting to `host`.
    fn name_for(&self, host: &str) -> Result<ServerName<'static>, String> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(ServerName::IpAddress(ip.into()));
        }
        ServerName::try_from(host.to_owned()).map_err(|_| {
            format!("{host:?} cannot be checked against a certificate; give --tls-server-name")
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|error| TlsSetupError::Read {
        path: path.to_owned(),
        error,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read(path)?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsSetupError::BadKey {
        path: path.to_owned(),
    })
}

/// A connection to a server, plain or TLS: what the frames travel on.
#[derive(Debug)]
pub struct ClientStream(Inner);

#[derive(Debug)]
enum Inner {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<FirstBytes<TcpStream>>>),
}

impl ClientStream {
    /// A plain TCP connection.
    pub fn plain(stream: TcpStream) -> Self {
        Self(Inner::Plain(stream))
    }
}

/// How the client opens a connection to a server, in two steps so that
/// the client can bound each with its own timeout and report between
/// them: `connect` reaches the port, `secure` makes the connection ready
/// for frames (a TLS handshake, or nothing). [`TcpConnector`] is the real
/// one; tests can hand out in-memory streams (`tokio::io::duplex`) and run
/// under paused time.
pub trait Connector: Send + Sync {
    /// A connection as `connect` gives it.
    type Transport: Send;
    /// What the frames travel on.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send;

    /// Opens a connection to `host:port`; also returns the peer's
    /// address, which events and errors name.
    fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> impl Future<Output = io::Result<(Self::Transport, SocketAddr)>> + Send;

    /// Makes a connection ready for frames (e.g. a TLS handshake with
    /// `host`). The handshake timeout covers this step and the hello.
    fn secure(
        &self,
        transport: Self::Transport,
        host: &str,
    ) -> impl Future<Output = Result<Self::Stream, HandshakeFailure>> + Send;
}

/// Real connections: TCP from an optional local address, with TLS when
/// configured.
#[derive(Debug, Clone, Default)]
pub struct TcpConnector {
    local_addr: Option<IpAddr>,
    tls: Option<ClientTls>,
}

impl TcpConnector {
    /// Connects from `local_addr` (any port) when given, over TLS when
    /// `tls` is given.
    pub fn new(local_addr: Option<IpAddr>, tls: Option<ClientTls>) -> Self {
        Self { local_addr, tls }
    }
}

impl Connector for TcpConnector {
    type Transport = TcpStream;
    type Stream = ClientStream;

    async fn connect(&self, host: &str, port: u16) -> io::Result<(TcpStream, SocketAddr)> {
        let stream = connect_from(host, port, self.local_addr).await?;
        // Frames are tiny and latency-sensitive (a NUMBER is 11 bytes).
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let addr = stream.peer_addr()?;
        Ok((stream, addr))
    }

    async fn secure(
        &self,
        stream: TcpStream,
        host: &str,
    ) -> Result<ClientStream, HandshakeFailure> {
        match &self.tls {
            None => Ok(ClientStream::plain(stream)),
            Some(tls) => handshake(tls, stream, host).await,
        }
    }
}

/// Connects to `host:port`, from `local` (any port) when given.
async fn connect_from(host: &str, port: u16, local: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(local) = local else {
        return TcpStream::connect((host, port)).await;
    };
    let mut last_error = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        if addr.is_ipv4() != local.is_ipv4() {
            continue;
        }
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(local, 0))?;
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host} has no address of the local address {local}'s family"),
        )
    }))
}

/// Why [`Connector::secure`] did not give a stream.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// The connection broke (EOF, reset): another attempt may work.
    Broken(io::Error),
    /// The server answered in plaintext numstream with an ERROR that asks
    /// for a retry (`server_busy` before TLS starts, a draining server):
    /// honoured like any such ERROR.
    PlaintextRetry(ErrorFrame),
    /// A mismatch no retry fixes; the text says which.
    Mismatch(String),
}

/// Runs the TLS handshake over `stream`, to `host` as `tls` says.
pub(crate) async fn handshake(
    tls: &ClientTls,
    stream: TcpStream,
    host: &str,
) -> Result<ClientStream, HandshakeFailure> {
    let name = tls.name_for(host).map_err(HandshakeFailure::Mismatch)?;
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let recorded = FirstBytes::new(stream);
    let stream = match connector
        .connect(name.clone(), recorded)
        .into_fallible()
        .await
    {
        Ok(stream) => stream,
        Err((error, recorded)) => {
            return Err(diagnose_handshake(error, &recorded.first, &name));
        }
    };
    if stream.get_ref().1.alpn_protocol() != Some(ALPN_NUMSTREAM) {
        return Err(HandshakeFailure::Mismatch(
            "the server speaks TLS but did not agree on ALPN numstream/1: it is not a \
             numstream server, or one too old for TLS"
                .to_owned(),
        ));
    }
    let mut stream = stream;
    stream.get_mut().0.first = Vec::new();
    stream.get_mut().0.recording = false;
    Ok(ClientStream(Inner::Tls(Box::new(stream))))
}

fn diagnose_handshake(error: io::Error, first: &[u8], name: &ServerName<'_>) -> HandshakeFailure {
    // A numstream frame where a TLS record should be: the server does not
    // speak TLS on this port, or refused before TLS began.
    let mut answer = bytes::BytesMut::from(first);
    if let Ok(Some(frame)) = decode_frame(&mut answer) {
        return match frame {
            Frame::Error(error) if error.disposition != Disposition::Final => {
                HandshakeFailure::PlaintextRetry(error)
            }
            Frame::Error(error) => HandshakeFailure::Mismatch(format!(
                "the server answered in plaintext, not TLS: it does not serve TLS on this \
                 port (drop --tls); it said {}: {}",
                error.code,
                escape(&error.message)
            )),
            other => HandshakeFailure::Mismatch(format!(
                "the server answered in plaintext ({}), not TLS: it does not serve TLS on \
                 this port (drop --tls)",
                other.name()
            )),
        };
    }
    match tls_mismatch(&error, Some(name)) {
        Some(mismatch) => HandshakeFailure::Mismatch(mismatch),
        None => HandshakeFailure::Broken(error),
    }
}

/// What a TLS error from the connection means for a person, if it is one
/// (rather than the connection breaking). `name` is the name the server's
/// certificate was checked against, when known.
pub(crate) fn tls_mismatch(error: &io::Error, name: Option<&ServerName<'_>>) -> Option<String> {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error as Tls};
    let tls = error.get_ref()?.downcast_ref::<Tls>()?;
    let name = name.map_or_else(String::new, |name| format!(" {}", name.to_str()));
    let why = match tls {
        Tls::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
            "the server's certificate has expired".to_owned()
        }
        Tls::InvalidCertificate(Cert::NotValidYet | Cert::NotValidYetContext { .. }) => {
            "the server's certificate is not valid yet".to_owned()
        }
        Tls::InvalidCertificate(Cert::UnknownIssuer) => {
            "the server's certificate is not signed by a trusted CA (give its CA with --tls-ca)"
                .to_owned()
        }
        Tls::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            format!(
                "the server's certificate is not valid for the name{name} (check --host or \
                 --tls-server-name)"
            )
        }
        Tls::InvalidCertificate(other) => {
            format!("the server's certificate is not acceptable: {other:?}")
        }
        Tls::AlertReceived(Alert::CertificateRequired) => {
            "the server requires a client certificate (give --tls-client-cert and \
             --tls-client-key)"
                .to_owned()
        }
        Tls::AlertReceived(
            alert @ (Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::UnsupportedCertificate
            | Alert::AccessDenied),
        ) => format!("the server refused our client certificate ({alert:?})"),
        Tls::AlertReceived(Alert::NoApplicationProtocol) | Tls::NoApplicationProtocol => {
            "the server speaks TLS but not numstream/1 (ALPN)".to_owned()
        }
        Tls::InvalidMessage(_) | Tls::InappropriateMessage { .. } => {
            "the server did not answer with TLS: it does not serve TLS on this port (drop \
             --tls), or it is not a numstream server"
                .to_owned()
        }
        other => format!("TLS failed: {other}"),
    };
    // Parts of a TLS error (names on a certificate) come from the server.
    Some(escape(&why))
}

/// A stream that keeps a copy of the first bytes read from it while
/// `recording`: what a server answered instead of TLS.
#[derive(Debug)]
struct FirstBytes<S> {
    inner: S,
    first: Vec<u8>,
    recording: bool,
}

impl<S> FirstBytes<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            first: Vec::new(),
            recording: true,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.recording && self.first.len() < FIRST_BYTES_KEPT {
            let fresh = &buf.filled()[before..];
            let room = FIRST_BYTES_KEPT - self.first.len();
            let kept = &fresh[..fresh.len().min(room)];
            self.first.extend_from_slice(kept);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.0 {
            Inner::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Inner::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.0 {
            Inner::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Inner::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            Inner::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Inner::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            Inner::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Inner::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_from_the_requested_local_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let local: IpAddr = "127.0.0.2".parse().expect("an address");
        let (connected, accepted) = tokio::join!(
            connect_from("127.0.0.1", port, Some(local)),
            listener.accept()
        );
        connected.expect("connect");
        assert_eq!(accepted.expect("accept").1.ip(), local);
        let mismatch = connect_from("127.0.0.1", port, Some("::1".parse().expect("v6")));
        assert!(mismatch.await.is_err());
    }
}
