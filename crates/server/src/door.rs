//! The door: what the accept loop does with a plain-TCP connection's first
//! bytes before the connection gets a task. It reads whatever hello has
//! already arrived, straight from the socket, and, while the server turns
//! new sessions away at once (`Overload::refuses_at_once`), answers an
//! OPEN there and then with `server_busy` and closes.
//!
//! Why here and not in the connection's task: under overload the task
//! runs late. Every hop of a handshake through the runtime (the first read,
//! which waits for the reactor to learn the socket is readable; the store
//! call; the write) waits behind every stream, seconds each when the
//! server is short of CPU. At 80,000 sessions on one core a refused
//! client's attempt cost the server about what a stream does (issue 15),
//! and a RESUME waited the same hops as the OPENs around it. At the door
//! a refusal is four system calls and no task; a hello that is let in
//! reaches its task already read, one hop sooner.
//!
//! Only an OPEN the session machine would take to admission is refused
//! here (`numstream_protocol::server::open_at_door`); anything else takes
//! the ordinary path and gets the answer a session machine gives it. TLS
//! connections always do: their first bytes are a TLS handshake.

use std::io::{Read, Write};
use std::net::Shutdown;

use bytes::BytesMut;
use socket2::SockRef;
use tokio::net::TcpStream;

use numstream_protocol::{Frame, encode_frame};

use crate::connection::Shared;
use crate::peers::PeerKey;
use crate::telemetry::AdmissionRefusal;

/// Bytes read at the door: a hello is at most 41 bytes (a RESUME); more
/// only means the client pipelined something behind it, which its session
/// machine judges.
const EARLY_BYTES: usize = 64;

/// What the door read of a connection before handing it on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Early {
    bytes: [u8; EARLY_BYTES],
    len: u8,
    /// The client closed its end after what it sent: it has stopped
    /// waiting for an answer.
    closed: bool,
}

impl Early {
    pub(crate) const NOTHING: Early = Early {
        bytes: [0; EARLY_BYTES],
        len: 0,
        closed: false,
    };

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Whether the client sent its hello and then closed the connection:
    /// it gave up waiting (most often in the listen backlog of a server
    /// that had paused accepting) and will try again with a new
    /// connection. Serving the hello anyway would make for an OPEN a
    /// session whose WELCOME nobody reads, and the client's next OPEN
    /// would find it there (`session_exists`) until it expired.
    pub(crate) fn abandoned(&self) -> bool {
        self.closed && self.len > 0
    }
}

/// Reads what has arrived on `stream` without waiting: nothing if nothing
/// has (or on end of stream or an error, which the connection's own first
/// read then finds).
pub(crate) fn read_now(stream: &TcpStream) -> Early {
    let mut early = Early::NOTHING;
    // The socket is non-blocking (tokio made it so): this never waits.
    // Read through the socket rather than tokio, whose readiness for a
    // socket just accepted is unknown until its reactor next turns.
    let socket = SockRef::from(stream);
    let read = (&*socket).read(&mut early.bytes).unwrap_or(0);
    early.len = u8::try_from(read).unwrap_or(0);
    // A hello is smaller than the buffer, so one read took all that had
    // arrived; a second one finds the end of the stream if the client has
    // closed since (or would block, as it does for a client still waiting).
    if read > 0 && read < EARLY_BYTES {
        early.closed = matches!((&*socket).read(&mut [0u8; 1]), Ok(0));
    }
    early
}

/// Whether the door turned the connection away: `early` is an OPEN and
/// the server refuses new sessions at once. The caller then drops
/// `stream`, which closes it after the ERROR.
pub(crate) fn turned_away(
    stream: &TcpStream,
    early: &Early,
    peer: PeerKey,
    shared: &Shared,
) -> bool {
    let Some(overloaded) = shared
        .overload
        .refuses_at_once(shared.telemetry.streaming_now())
    else {
        return false;
    };
    if numstream_protocol::server::open_at_door(early.bytes()).is_none() {
        return false;
    }
    shared.admission_refused(AdmissionRefusal::Overload, peer);
    let error = overloaded.refusal();
    shared.telemetry.rejected(error.code);
    let mut out = BytesMut::new();
    encode_frame(&Frame::Error(error), &mut out);
    // An empty send buffer takes a few dozen bytes whole. The hello was
    // read, so closing sends FIN after the ERROR, not RST, and the client
    // reads the ERROR before the end of the stream.
    let socket = SockRef::from(stream);
    let _ = (&*socket).write(&out);
    let _ = socket.shutdown(Shutdown::Write);
    true
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::BytesMut;
    use numstream_protocol::{ClientId, ErrorCode, Open, Resume, ResumeToken, decode_frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::test_store::TestStore;

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(frame, &mut out);
        out.to_vec()
    }

    fn open() -> Frame {
        Frame::Open(Open {
            client_id: ClientId::from_u128(7),
            count: 10,
        })
    }

    /// A client that has sent `hello`, and the server's side of it once
    /// the hello is there to be read.
    async fn connected(hello: &[u8]) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        client.write_all(hello).await.expect("send the hello");
        let (server, _) = listener.accept().await.expect("accept");
        // The door reads without waiting; give loopback the moment it
        // needs to deliver the bytes (bounded: a hang fails, not waits).
        numstream_harness::wait::until(Duration::from_secs(10), "the hello to arrive", || {
            let server = &server;
            async move { server.peek(&mut [0u8; 1]).await.is_ok_and(|n| n > 0) }
        })
        .await;
        (client, server)
    }

    fn refusing_shared() -> Arc<Shared> {
        let shared = crate::connection::tests::test_shared(Arc::new(TestStore::default()));
        shared.overload.force_refusing_at_once();
        shared
    }

    #[tokio::test]
    async fn an_open_is_refused_at_the_door_with_server_busy_then_a_clean_close() {
        let shared = refusing_shared();
        let (mut client, server) = connected(&encoded(&open())).await;
        let early = read_now(&server);
        assert_eq!(early.bytes(), encoded(&open()));
        let peer = PeerKey::from(server.peer_addr().expect("peer").ip());
        assert!(turned_away(&server, &early, peer, &shared));
        drop(server);
        let mut answer = Vec::new();
        client
            .read_to_end(&mut answer)
            .await
            .expect("a clean end of stream, not a reset");
        let mut answer = BytesMut::from(&answer[..]);
        match decode_frame(&mut answer).expect("a valid frame") {
            Some(Frame::Error(error)) => {
                assert_eq!(error.code, ErrorCode::ServerBusy);
                assert!(error.message.contains("overloaded"), "{}", error.message);
            }
            other => panic!("expected ERROR server_busy, got {other:?}"),
        }
        assert!(answer.is_empty(), "nothing after the ERROR");
    }

    #[tokio::test]
    async fn a_resume_or_an_unfinished_hello_is_let_in_with_what_was_read() {
        let shared = refusing_shared();
        let resume = encoded(&Frame::Resume(Resume {
            client_id: ClientId::from_u128(7),
            token: ResumeToken([3; 16]),
            next_index: 2,
        }));
        let part_of_an_open = encoded(&open())[..10].to_vec();
        for hello in [resume, part_of_an_open] {
            let (_client, server) = connected(&hello).await;
            let early = read_now(&server);
            let peer = PeerKey::from(server.peer_addr().expect("peer").ip());
            assert!(!turned_away(&server, &early, peer, &shared));
            assert_eq!(early.bytes(), hello, "what was read goes to the connection");
        }
    }

    #[tokio::test]
    async fn a_hello_whose_client_has_closed_is_seen_as_abandoned() {
        let (client, server) = connected(&encoded(&open())).await;
        assert!(!read_now(&server).abandoned(), "the client still waits");
        drop(client);
        let (client, server) = connected(&encoded(&open())).await;
        drop(client);
        numstream_harness::wait::until(Duration::from_secs(10), "the close to arrive", || {
            let server = &server;
            async move {
                let ready = server.ready(tokio::io::Interest::READABLE).await;
                ready.is_ok_and(|ready| ready.is_read_closed())
            }
        })
        .await;
        let early = read_now(&server);
        assert_eq!(early.bytes(), encoded(&open()));
        assert!(early.abandoned(), "the client closed after its hello");
    }

    #[tokio::test]
    async fn an_open_is_let_in_while_the_server_is_not_refusing() {
        let shared = crate::connection::tests::test_shared(Arc::new(TestStore::default()));
        let (_client, server) = connected(&encoded(&open())).await;
        let early = read_now(&server);
        let peer = PeerKey::from(server.peer_addr().expect("peer").ip());
        assert!(!turned_away(&server, &early, peer, &shared));
    }
}
