//! The sequence checksum: CRC-32C (Castagnoli) over the values in index
//! order, each as 4 big-endian bytes.
//!
//! A CRC is position-sensitive, so a reordered, dropped, duplicated or
//! altered number changes it (a plain sum would miss reorderings). The
//! server computes it from the seed, never from what a connection carried.

use crate::prng::{NumberGenerator, SessionSeed};

/// Running checksum and sum of a prefix of a sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SequenceChecksum {
    crc: u32,
    sum: u64,
    len: u32,
}

impl SequenceChecksum {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the next value of the sequence.
    pub fn push(&mut self, value: u32) {
        self.crc = crc32c::crc32c_append(self.crc, &value.to_be_bytes());
        self.sum += u64::from(value);
        self.len += 1;
    }

    /// CRC-32C of everything pushed so far.
    pub fn checksum(&self) -> u32 {
        self.crc
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
