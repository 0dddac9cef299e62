//! A raw protocol client for tests that must send exactly the bytes they
//! choose, from any loopback source address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use numstream_protocol::codec::{CodecError, FrameCodec};
use numstream_protocol::{ErrorCode, Frame};

/// Connects to `addr` from `source`, the port left to the kernel: bind
/// before connect.
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    crate::proxy::socket_from(addr, source)?.connect(addr).await
}

/// A port on 127.0.0.1 that nothing listens on, for a client's "server
/// down" path: the kernel picks a free one, and it is released at once,
/// so connects to it are refused.
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .unwrap_or_else(|error| panic!("cannot bind a probe socket on 127.0.0.1: {error}"))
        .port()
}

/// How long raw-client reads wait before a test fails instead of hanging.
pub const RAW_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A protocol client that sends exactly what the test says.
#[derive(Debug)]
pub struct RawClient {
    framed: Framed<TcpStream, FrameCodec>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect to server");
        Self::over(stream)
    }

    /// Connects from `source` (any 127.x.y.z is a distinct peer on
    /// loopback), so tests can play several clients' addresses at once.
    pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> Self {
        let stream = connect_from(source, addr)
            .await
            .unwrap_or_else(|error| panic!("connect to {addr} from {source}: {error}"));
        Self::over(stream)
    }

    /// Connects to `addr` and sends an OPEN of `count` numbers for a
    /// fresh client id: a client that then waits for its answer.
    pub async fn opened(addr: SocketAddr, count: u16) -> Self {
        let mut client = Self::connect(addr).await;
        client
            .send(Frame::Open(numstream_protocol::Open {
                client_id: numstream_protocol::ClientId::new_v4(),
                count,
            }))
            .await;
        client
    }

    /// A raw client on an already connected stream.
    pub fn over(stream: TcpStream) -> Self {
        Self {
            framed: Framed::new(stream, FrameCodec),
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        self.framed.send(frame).await.expect("send frame");
    }

    /// Sends raw bytes, bypassing the encoder.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let stream = self.framed.get_mut();
        stream.write_all(bytes).await.expect("send bytes");
    }

    /// The next frame; `None` on a clean close. Panics after
    /// `RAW_READ_TIMEOUT`, so a hanging server fails the test.
    pub async fn recv(&mut self) -> Option<Result<Frame, CodecError>> {
        tokio::time::timeout(RAW_READ_TIMEOUT, self.framed.next())
            .await
            .expect("server must answer or close within the read timeout")
    }

    /// The next frame, which must decode.
    pub async fn frame(&mut self) -> Frame {
        match self.recv().await {
            Some(Ok(frame)) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Asserts the next frame is an ERROR with `code`, then that the server
    /// closes the connection. Returns the message.
    pub async fn expect_error(&mut self, code: ErrorCode) -> String {
        let message = match self.frame().await {
            Frame::Error(error) => {
                assert_eq!(error.code, code, "unexpected error: {error}");
                error.message
            }
            other => panic!("expected ERROR {code}, got {other:?}"),
        };
        self.expect_closed().await;
        message
    }

    /// Asserts the server closes the connection without sending anything.
    pub async fn expect_closed(&mut self) {
        match self.recv().await {
            None | Some(Err(CodecError::Io(_))) => {}
            Some(other) => panic!("expected the server to close, got {other:?}"),
        }
    }

    /// Raw read buffer, for tests that inspect partial frames.
    pub fn read_buffer(&self) -> &BytesMut {
        self.framed.read_buffer()
    }
}
