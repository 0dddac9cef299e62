//! Certificates made at run time (rcgen) for the TLS tests, written as PEM
//! files into a temporary directory removed on drop: a CA, a server
//! certificate for `localhost` and `127.0.0.1`, an expired one, one for
//! another name, one from an untrusted CA, and a client CA with a client
//! certificate for mutual TLS. No key is ever committed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;

/// A certificate and its key on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate's DER, to recognise it on the wire.
    pub der: Vec<u8>,
}

/// Every certificate the TLS tests need, in a directory of their own.
#[derive(Debug)]
pub struct TestPki {
    dir: PathBuf,
    /// The CA that signs the server certificates (what `--tls-ca` trusts).
    pub ca: PathBuf,
    /// Valid for `localhost` and `127.0.0.1`, signed by `ca`.
    pub server: CertFiles,
    /// Like `server`, but its validity ended in 2020.
    pub expired: CertFiles,
    /// Signed by `ca`, valid only for `elsewhere.invalid`.
    pub wrong_name: CertFiles,
    /// For `localhost` and `127.0.0.1`, signed by a CA nobody trusts.
    pub untrusted: CertFiles,
    /// The CA client certificates must chain to (`--tls-client-ca`).
    pub client_ca: PathBuf,
    /// A client certificate signed by `client_ca`.
    pub client: CertFiles,
    /// A client certificate signed by `ca` (not the client CA).
    pub stranger: CertFiles,
}

impl TestPki {
    /// Generates everything into a fresh temporary directory.
    pub fn generate() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "numstream-tls-{}-{}",
            std::process::id(),
            uuid_like()
        ));
        std::fs::create_dir_all(&dir).expect("create the certificate directory");
        let ca = authority("numstream test CA");
        let other_ca = authority("untrusted test CA");
        let client_ca = authority("numstream test client CA");
        let local = ["localhost", "127.0.0.1"];
        let server = leaf(&dir, "server", &ca, &local, Usage::Server, false);
        let expired = leaf(&dir, "expired", &ca, &local, Usage::Server, true);
        let wrong_name = leaf(
            &dir,
            "wrong-name",
            &ca,
            &["elsewhere.invalid"],
            Usage::Server,
            false,
        );
        let untrusted = leaf(&dir, "untrusted", &other_ca, &local, Usage::Server, false);
        let client = leaf(
            &dir,
            "client",
            &client_ca,
            &["client"],
            Usage::Client,
            false,
        );
        let stranger = leaf(&dir, "stranger", &ca, &["stranger"], Usage::Client, false);
        let ca_path = write(&dir, "ca.pem", &ca.pem());
        let client_ca_path = write(&dir, "client-ca.pem", &client_ca.pem());
        Self {
            dir,
            ca: ca_path,
            server,
            expired,
            wrong_name,
            untrusted,
            client_ca: client_ca_path,
            client,
            stranger,
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy)]
enum Usage {
    Server,
    Client,
}

fn authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("a CA key");
    CertifiedIssuer::self_signed(params, key).expect("a self-signed CA")
}

fn leaf(
    dir: &Path,
    name: &str,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: Usage,
    expired: bool,
) -> CertFiles {
    let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    let mut params = CertificateParams::new(names).expect("leaf parameters");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![match usage {
        Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    if expired {
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    }
    let key = KeyPair::generate().expect("a leaf key");
    let certificate = params.signed_by(&key, issuer).expect("a signed leaf");
    CertFiles {
        cert: write(dir, &format!("{name}.pem"), &certificate.pem()),
        key: write(dir, &format!("{name}.key"), &key.serialize_pem()),
        der: certificate.der().to_vec(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a certificate file");
    path
}

/// A name unique enough for a temporary directory, without a dependency.
fn uuid_like() -> u128 {
    use std::time::{SystemTime, UNIX_EPOCH};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    now ^ u128::from(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// Completes a TLS handshake with `addr` (as `localhost`, trusting `ca`,
/// offering ALPN `numstream/1`) and returns the server's certificate: which
/// certificate a new connection is served with.
pub async fn peer_certificate(addr: SocketAddr, ca: &Path) -> std::io::Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca)?;
    for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let certificate = certificate.map_err(std::io::Error::other)?;
        roots.add(certificate).map_err(std::io::Error::other)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![numstream_protocol::ALPN_NUMSTREAM.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name =
        rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    let stream = connector.connect(name, tcp).await?;
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|certificate| certificate.to_vec())
        .ok_or_else(|| std::io::Error::other("the server presented no certificate"))
}
