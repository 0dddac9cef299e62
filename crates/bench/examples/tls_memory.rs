//! Where numstream-server's memory per TLS connection goes. Builds `N`
//! rustls server connections configured as numstream-server configures
//! them (TLS 1.3, ring, ALPN `numstream/1`, the rustls defaults otherwise),
//! drives each through a full handshake with an in-memory client that is
//! dropped right after, so the process's RSS grows by the server side only,
//! and reads RSS after each phase of a connection's life. `--tickets K`
//! sets `ServerConfig::send_tls13_tickets` (rustls default: 2).
//!
//! `cargo run --release -p numstream-bench --example tls_memory -- 20000`

use std::io::{Read, Write};
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConnection, Connection, ServerConnection};

/// The process's resident set, in bytes.
fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("short /proc/self/statm")?
        .parse()?;
    Ok(pages * 4096)
}

/// Moves every TLS byte `from` has to send into `to`, and lets `to`
/// process them.
fn pump(from: &mut Connection, to: &mut Connection) -> anyhow::Result<()> {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire)?;
    }
    let mut rest = wire.as_slice();
    while !rest.is_empty() {
        to.read_tls(&mut rest)?;
        to.process_new_packets()?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut connections = 20_000usize;
    let mut tickets = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tickets" => tickets = Some(args.next().context("--tickets K")?.parse()?),
            n => connections = n.parse().context("the argument is N, a count")?,
        }
    }
    let pki = numstream_harness::tls::TestPki::generate();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(&pki.server.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&pki.server.key)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    server.alpn_protocols = vec![numstream_server::ALPN_NUMSTREAM.to_vec()];
    if let Some(tickets) = tickets {
        server.send_tls13_tickets = tickets;
    }
    let server = Arc::new(server);
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&pki.ca)? {
        roots.add(ca?)?;
    }
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![numstream_server::ALPN_NUMSTREAM.to_vec()];
    let client = Arc::new(client);
    let name = ServerName::try_from("127.0.0.1")?;

    println!(
        "{connections} server connections, send_tls13_tickets = {}; size_of::<ServerConnection>() = {} B (inline, in the connection's task)",
        server.send_tls13_tickets,
        std::mem::size_of::<ServerConnection>()
    );
    let mut servers: Vec<Connection> = Vec::with_capacity(connections);
    // The client's first record (an ACK-sized 16 bytes), encrypted before
    // the client is dropped and read by the server in the last phase.
    let mut from_client: Vec<Vec<u8>> = Vec::with_capacity(connections);
    let before = rss_bytes()?;
    for _ in 0..connections {
        let mut s = Connection::Server(ServerConnection::new(server.clone())?);
        let mut c = Connection::Client(ClientConnection::new(client.clone(), name.clone())?);
        while s.is_handshaking() || c.is_handshaking() {
            pump(&mut c, &mut s)?;
            pump(&mut s, &mut c)?;
        }
        c.writer().write_all(&[0u8; 16])?;
        let mut record = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut record)?;
        }
        from_client.push(record);
        servers.push(s);
    }
    let handshaken = rss_bytes()?;
    let mut sink = Vec::with_capacity(64 * 1024);
    for s in &mut servers {
        // A numstream NUMBER frame is 12 bytes.
        s.writer().write_all(&[0u8; 12])?;
        while s.wants_write() {
            s.write_tls(&mut sink)?;
        }
        sink.clear();
    }
    let sent = rss_bytes()?;
    let mut plain = [0u8; 64];
    for (s, record) in servers.iter_mut().zip(&from_client) {
        let mut rest = record.as_slice();
        while !rest.is_empty() {
            s.read_tls(&mut rest)?;
            s.process_new_packets()?;
        }
        let read = s.reader().read(&mut plain)?;
        anyhow::ensure!(read == 16, "the server read {read} bytes of 16");
    }
    let received = rss_bytes()?;
    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / connections as f64;
    println!("heap per server connection (RSS growth / N):");
    println!(
        "  after the handshake (tickets sent)      {:>8.0} B",
        per(before, handshaken)
    );
    println!(
        "  + one 12-byte frame encrypted and sent  {:>8.0} B",
        per(handshaken, sent)
    );
    println!(
        "  + one 16-byte record received and read {:>8.0} B",
        per(sent, received)
    );
    println!(
        "  total                                   {:>8.0} B",
        per(before, received)
    );
    println!(
        "(the pending client records, {} B each, are in the first figure)",
        from_client.first().map_or(0, Vec::len)
    );
    Ok(())
}
