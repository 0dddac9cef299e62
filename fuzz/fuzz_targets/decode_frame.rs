//! `decode_frame` on arbitrary bytes: never panics, never consumes a partial
//! frame, and every frame it accepts re-encodes to exactly the bytes it
//! consumed (the encoding is canonical, so no two byte strings mean the same
//! frame).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use numstream_protocol::{decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match decode_frame(&mut buf) {
            Ok(Some(frame)) => {
                let consumed = before.len() - buf.len();
                let mut again = BytesMut::new();
                encode_frame(&frame, &mut again);
                assert_eq!(
                    &again[..],
                    &before[..consumed],
                    "{frame:?} is not canonical"
                );
            }
            Ok(None) => {
                assert_eq!(buf, before, "an incomplete frame must consume nothing");
                break;
            }
            Err(_) => break,
        }
    }
});
