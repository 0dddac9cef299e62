//! The bare baseline: the least a server can do to deliver the same bytes on
//! the same schedule. No protocol, no session, no store, no PRNG, no
//! checksum: the client sends 8 bytes (count, interval, first index), the
//! server writes 11-byte frames (the size of a NUMBER) at
//! `t0 + k * interval`, or all at once through a 64 KiB buffer when the
//! interval is 0, and closes. Every measurement of numstream is paired with
//! this program under the same load, so the ratio says what the protocol
//! costs and the absolute figure says what the machine allows.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::{Instant, sleep_until};

use crate::probe::Probe;

/// Frame size, equal to a numstream NUMBER frame.
pub(crate) const FRAME_LEN: usize = 11;
const HELLO_LEN: usize = 8;
/// Burst-mode write buffer, as in the bare measurement.
const BURST_BUFFER: usize = 64 * 1024;
/// Reconnects a bare client allows itself before giving up.
const MAX_RECONNECTS: u32 = 100;

/// The value the bare server sends at `index` (cheap, and checkable).
fn value_at(index: u16) -> u32 {
    u32::from(index).wrapping_mul(0x9e37_79b1)
}

fn frame(index: u16) -> [u8; FRAME_LEN] {
    let mut frame = [0u8; FRAME_LEN];
    frame[..4].copy_from_slice(&7u32.to_be_bytes());
    frame[4] = 0x82;
    frame[5..7].copy_from_slice(&index.to_be_bytes());
    frame[7..].copy_from_slice(&value_at(index).to_be_bytes());
    frame
}

/// Serves the bare protocol on `listener` forever.
pub(crate) async fn serve(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    let _ = serve_one(stream).await;
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn serve_one(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut hello = [0u8; HELLO_LEN];
    stream.read_exact(&mut hello).await?;
    let count = u16::from_be_bytes([hello[0], hello[1]]);
    let interval = Duration::from_micros(u64::from(u32::from_be_bytes([
        hello[2], hello[3], hello[4], hello[5],
    ])));
    let start = u16::from_be_bytes([hello[6], hello[7]]);
    let t0 = Instant::now();
    if interval.is_zero() {
        let mut writer = BufWriter::with_capacity(BURST_BUFFER, &mut stream);
        for index in start..count {
            writer.write_all(&frame(index)).await?;
        }
        writer.flush().await?;
    } else {
        for index in start..count {
            // Like numstream, the first frame goes out at once: a sleep
            // until `t0` would round it up to the timer's next tick and
            // shift the whole schedule with it, hiding the rounding.
            if index != start {
                sleep_until(t0 + interval * u32::from(index - start)).await;
            }
            stream.write_all(&frame(index)).await?;
        }
    }
    stream.shutdown().await
}

/// Connects to `addr`, from `source` when given (port chosen by the kernel).
pub(crate) async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One bare session of `count` frames: reconnects at once after a drop and
/// asks for the first frame it lacks; checks every index and value.
pub(crate) async fn session(
    addr: SocketAddr,
    source: Option<IpAddr>,
    count: u16,
    interval: Duration,
    probe: &mut Probe<'_>,
) -> Result<(), String> {
    let mut next: u16 = 0;
    let mut reconnects = 0;
    let interval_us = u32::try_from(interval.as_micros()).unwrap_or(u32::MAX);
    loop {
        let stream = connect(addr, source)
            .await
            .map_err(|e| format!("bare connect to {addr}: {e}"))?;
        let mut reader =
            BufReader::with_capacity(if interval.is_zero() { BURST_BUFFER } else { 64 }, stream);
        let mut hello = [0u8; HELLO_LEN];
        hello[..2].copy_from_slice(&count.to_be_bytes());
        hello[2..6].copy_from_slice(&interval_us.to_be_bytes());
        hello[6..].copy_from_slice(&next.to_be_bytes());
        reader
            .get_mut()
            .write_all(&hello)
            .await
            .map_err(|e| format!("bare hello: {e}"))?;
        let mut buf = [0u8; FRAME_LEN];
        let mut first = true;
        while next < count {
            if reader.read_exact(&mut buf).await.is_err() {
                break;
            }
            let index = u16::from_be_bytes([buf[5], buf[6]]);
            let value = u32::from_be_bytes([buf[7], buf[8], buf[9], buf[10]]);
            if index != next || value != value_at(index) || buf[..5] != frame(index)[..5] {
                return Err(format!("bare frame {index} (expected {next}) is wrong"));
            }
            if first {
                // The bare stream has no WELCOME: the schedule's origin is
                // the arrival of its first frame.
                probe.welcomed(index);
                first = false;
            }
            probe.number(index);
            next += 1;
        }
        if next == count {
            return Ok(());
        }
        probe.retrying("bare connection lost");
        reconnects += 1;
        if reconnects > MAX_RECONNECTS {
            return Err(format!("bare session lost {reconnects} connections"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Shards;

    #[tokio::test]
    async fn a_bare_session_delivers_every_frame() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener));
        let lateness = Shards::new();
        for interval in [Duration::ZERO, Duration::from_millis(1)] {
            let mut probe = Probe::new(0, interval, Some(&lateness));
            session(addr, None, 50, interval, &mut probe)
                .await
                .expect("bare session");
            assert_eq!(probe.numbers, 50);
        }
    }
}
