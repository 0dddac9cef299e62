//! The sequence checksum: CRC-32C (Castagnoli) over the values in index
//! order, each as 4 big-endian bytes.
//!
//! A CRC is position-sensitive, so a reordered, dropped, duplicated or
//! altered number changes it (a plain sum would miss reorderings). The
//! server computes it from the seed, never from what a connection carried.

use crate::prng::{NumberGenerator, SessionSeed};

/// Values buffered before they are folded into the CRC: one CRC call per
/// 16 values instead of one per value (a call costs about as much as
/// hashing 64 bytes with the hardware instruction).
const PENDING_VALUES: usize = 16;

/// Running checksum and sum of a prefix of a sequence.
#[derive(Debug, Clone, Copy)]
pub struct SequenceChecksum {
    /// CRC of every value except the `len % PENDING_VALUES` pending ones.
    crc: u32,
    /// The pending values, big-endian, not yet in `crc`.
    pending: [u8; 4 * PENDING_VALUES],
    sum: u64,
    len: u32,
}

impl Default for SequenceChecksum {
    fn default() -> Self {
        Self {
            crc: 0,
            pending: [0; 4 * PENDING_VALUES],
            sum: 0,
            len: 0,
        }
    }
}

impl PartialEq for SequenceChecksum {
    fn eq(&self, other: &Self) -> bool {
        (self.checksum(), self.sum, self.len) == (other.checksum(), other.sum, other.len)
    }
}

impl Eq for SequenceChecksum {}

impl SequenceChecksum {
    pub fn new() -> Self {
        Self::default()
    }

    fn pending_len(&self) -> usize {
        4 * (self.len as usize % PENDING_VALUES)
    }

    /// Appends the next value of the sequence.
    pub fn push(&mut self, value: u32) {
        let at = self.pending_len();
        self.pending[at..at + 4].copy_from_slice(&value.to_be_bytes());
        self.sum += u64::from(value);
        self.len += 1;
        if self.pending_len() == 0 {
            self.crc = crc32c::crc32c_append(self.crc, &self.pending);
        }
    }

    /// CRC-32C of everything pushed so far.
    pub fn checksum(&self) -> u32 {
        crc32c::crc32c_append(self.crc, &self.pending[..self.pending_len()])
    }

    /// Arithmetic sum of everything pushed so far (at most 65535 × (2³²−1),
    /// so it cannot overflow a u64).
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// How many values were pushed.
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checksum and sum of a whole session, computed from its seed.
    pub fn of_session(seed: &SessionSeed, count: u16) -> Self {
        let mut generator = NumberGenerator::starting_at(seed, 0);
        let mut checksum = Self::new();
        for _ in 0..count {
            checksum.push(generator.next_number());
        }
        checksum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Test vectors from PROTOCOL.md.
    #[test]
    fn pinned_vectors() {
        // CRC-32C check value: "123456789" -> 0xE3069283; here: values
        // 0x31323334, 0x35363738 as big-endian bytes = "12345678".
        let mut c = SequenceChecksum::new();
        c.push(0x3132_3334);
        c.push(0x3536_3738);
        assert_eq!(c.checksum(), crc32c::crc32c(b"12345678"));
        assert_eq!(c.sum(), 0x3132_3334 + 0x3536_3738);
    }

    #[test]
    fn buffering_does_not_change_the_checksum() {
        let values: Vec<u32> = (0..100u32).map(|i| i.wrapping_mul(0x9e37_79b1)).collect();
        let mut bytes = Vec::new();
        let mut c = SequenceChecksum::new();
        for (n, value) in values.iter().enumerate() {
            c.push(*value);
            bytes.extend_from_slice(&value.to_be_bytes());
            assert_eq!(
                c.checksum(),
                crc32c::crc32c(&bytes),
                "after {} values",
                n + 1
            );
        }
    }

    fn of(values: &[u32]) -> u32 {
        let mut c = SequenceChecksum::new();
        values.iter().for_each(|v| c.push(*v));
        c.checksum()
    }

    proptest! {
        #[test]
        fn sensitive_to_order_drops_duplicates_and_changes(
            values in proptest::collection::vec(any::<u32>(), 2..50),
            pick in any::<prop::sample::Index>(),
        ) {
            let original = of(&values);
            let i = pick.index(values.len() - 1);
            if values[i] != values[i + 1] {
                let mut swapped = values.clone();
                swapped.swap(i, i + 1);
                prop_assert_ne!(of(&swapped), original);
            }
            let mut dropped = values.clone();
            dropped.remove(i);
            prop_assert_ne!(of(&dropped), original);
            let mut duplicated = values.clone();
            duplicated.insert(i, values[i]);
            prop_assert_ne!(of(&duplicated), original);
            let mut altered = values.clone();
            altered[i] ^= 1;
            prop_assert_ne!(of(&altered), original);
        }
    }
}
