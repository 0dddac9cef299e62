//! In-memory connections for the client's tests: [`MemoryNet`] is a
//! [`Connector`] that gives the client one end of a `tokio::io::duplex`
//! pipe per connect and the fake server, listening on a made-up port, the
//! other. No sockets and no kernel timing: such tests run under paused
//! time, where the clock moves only when every task waits.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use numstream_client::{Connector, HandshakeFailure};
use numstream_protocol::Frame;
use numstream_protocol::codec::FrameCodec;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;

use super::{PATIENCE, Script};

/// The fake server's end of an in-memory connection.
pub(crate) type MemoryConn = Framed<DuplexStream, FrameCodec>;

/// Room in each direction of a pipe: far more than a test's frames, so
/// writes never wait on the reader.
const PIPE_BYTES: usize = 64 * 1024;

/// Made-up ports and who listens on them.
#[derive(Debug, Clone, Default)]
pub(crate) struct MemoryNet {
    ports: Arc<Mutex<HashMap<u16, mpsc::UnboundedSender<DuplexStream>>>>,
}

/// Connections to one port of a [`MemoryNet`]; dropping it closes the port
/// (later connects are refused, as on a port nothing listens on).
pub(crate) struct MemoryListener {
    incoming: mpsc::UnboundedReceiver<DuplexStream>,
}

impl MemoryNet {
    pub(crate) fn listen(&self, port: u16) -> MemoryListener {
        let (sender, incoming) = mpsc::unbounded_channel();
        self.ports
            .lock()
            .expect("the port table is never poisoned")
            .insert(port, sender);
        MemoryListener { incoming }
    }
}

impl MemoryListener {
    pub(crate) async fn accept(&mut self) -> MemoryConn {
        let stream = tokio::time::timeout(PATIENCE, self.incoming.recv())
            .await
            .expect("client never connected")
            .expect("the net outlives its listeners");
        Framed::new(stream, FrameCodec)
    }

    /// Runs one [`Script`] per connection, in the order they come, as the
    /// harness's `FakeServer` does over TCP; the port closes when the last
    /// script ends. Yields what the client sent on each connection.
    pub(crate) fn serve(mut self, scripts: Vec<Script>) -> JoinHandle<Vec<Vec<Frame>>> {
        tokio::spawn(async move {
            let mut received = Vec::new();
            for script in scripts {
                received.push(script.run(self.accept().await).await);
            }
            received
        })
    }
}

impl Connector for MemoryNet {
    type Transport = DuplexStream;
    type Stream = DuplexStream;

    async fn connect(&self, _host: &str, port: u16) -> io::Result<(DuplexStream, SocketAddr)> {
        let listening = self
            .ports
            .lock()
            .expect("the port table is never poisoned")
            .get(&port)
            .cloned();
        let (client, server) = tokio::io::duplex(PIPE_BYTES);
        match listening {
            Some(listener) if listener.send(server).is_ok() => {
                Ok((client, SocketAddr::from(([127, 0, 0, 1], port))))
            }
            _ => Err(io::ErrorKind::ConnectionRefused.into()),
        }
    }

    async fn secure(
        &self,
        stream: DuplexStream,
        _host: &str,
    ) -> Result<DuplexStream, HandshakeFailure> {
        Ok(stream)
    }
}
