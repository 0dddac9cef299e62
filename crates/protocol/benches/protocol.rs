//! The protocol's hot pure parts: what the server does per number (generate,
//! encode), what the client does per number (decode, verify) and the
//! per-session checksum. Run: `cargo bench -p numstream-protocol`.

use std::hint::black_box;
use std::num::NonZeroU16;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use numstream_protocol::prng::NumberGenerator;
use numstream_protocol::{
    Frame, ResumeToken, SequenceChecksum, SequenceReceiver, SessionSeed, Welcome, decode_frame,
    encode_frame, number_at,
};

const SEED: SessionSeed = SessionSeed([7; 32]);
const FULL: u16 = u16::MAX;

/// One whole session as the server writes it: WELCOME, NUMBERs, FINAL.
fn session_bytes(count: u16) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_frame(
        &Frame::Welcome(Welcome {
            count,
            next_index: 0,
            token: ResumeToken([1; 16]),
            interval_us: 0,
            session_ttl_ms: 30_000,
        }),
        &mut buf,
    );
    let mut numbers = NumberGenerator::starting_at(&SEED, 0);
    for index in 0..count {
        let value = numbers.next_number();
        if index + 1 == count {
            let checksum = SequenceChecksum::of_session(&SEED, count).checksum();
            encode_frame(
                &Frame::Final {
                    index,
                    value,
                    checksum,
                },
                &mut buf,
            );
        } else {
            encode_frame(&Frame::Number { index, value }, &mut buf);
        }
    }
    buf
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1024));
    group.bench_function("encode 1024 NUMBER", |b| {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        b.iter(|| {
            buf.clear();
            for index in 0..1024u16 {
                encode_frame(
                    &Frame::Number {
                        index,
                        value: u32::from(index),
                    },
                    &mut buf,
                );
            }
            black_box(&buf);
        });
    });
    let mut encoded = BytesMut::new();
    for index in 0..1024u16 {
        encode_frame(
            &Frame::Number {
                index,
                value: u32::from(index),
            },
            &mut encoded,
        );
    }
    group.bench_function("decode 1024 NUMBER", |b| {
        b.iter_batched_ref(
            || encoded.clone(),
            |src| {
                while let Some(frame) = decode_frame(src).expect("valid frames") {
                    black_box(frame);
                }
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn numbers(c: &mut Criterion) {
    let mut group = c.benchmark_group("prng");
    group.bench_function("number_at (random access)", |b| {
        let mut index = 0u16;
        b.iter(|| {
            index = index.wrapping_add(7919);
            black_box(number_at(&SEED, black_box(index)))
        });
    });
    group.throughput(Throughput::Elements(u64::from(FULL)));
    group.bench_function("sequential 65535", |b| {
        b.iter(|| {
            let mut numbers = NumberGenerator::starting_at(&SEED, 0);
            let mut acc = 0u32;
            for _ in 0..FULL {
                acc ^= numbers.next_number();
            }
            black_box(acc)
        });
    });
    group.finish();
}

fn checksums(c: &mut Criterion) {
    let mut group = c.benchmark_group("checksum");
    group.throughput(Throughput::Elements(u64::from(FULL)));
    group.bench_function("of_session 65535 (server, from the seed)", |b| {
        b.iter(|| black_box(SequenceChecksum::of_session(&SEED, black_box(FULL))));
    });
    group.bench_function("push 65535 (client, value by value)", |b| {
        let values: Vec<u32> = {
            let mut numbers = NumberGenerator::starting_at(&SEED, 0);
            (0..FULL).map(|_| numbers.next_number()).collect()
        };
        b.iter(|| {
            let mut checksum = SequenceChecksum::new();
            for value in &values {
                checksum.push(*value);
            }
            black_box(checksum)
        });
    });
    group.finish();
}

/// The client's whole per-session CPU path minus the socket: decode every
/// frame of a 65,535-number session and verify it.
fn client_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("client");
    group.throughput(Throughput::Elements(u64::from(FULL)));
    let bytes = session_bytes(FULL);
    let client_id = uuid::Uuid::from_u128(0x6f1f_6f53_4c1c_4a55_9d55_2d43_b1e2_b0a1);
    group.bench_function("decode + verify 65535", |b| {
        b.iter_batched_ref(
            || {
                (
                    bytes.clone(),
                    SequenceReceiver::new(client_id, NonZeroU16::MAX),
                )
            },
            |(src, receiver)| {
                let _hello = receiver.hello();
                while let Some(frame) = decode_frame(src).expect("valid frames") {
                    black_box(receiver.accept(frame).expect("accepted"));
                }
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(benches, frames, numbers, checksums, client_path);
criterion_main!(benches);
