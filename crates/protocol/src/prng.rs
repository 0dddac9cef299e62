//! The session number generator: number `i` of a session is a pure function
//! of the session seed and `i`.
//!
//! Number `i` is the little-endian 32-bit word `i` of the ChaCha20 keystream
//! keyed by the 32-byte seed, with a zero nonce and the block counter starting
//! at 0 (word `i` lives in block `i / 16`, position `i % 16`). ChaCha is a
//! counter-mode generator, so reaching any index costs one block computation:
//! any server instance can continue any session at any point and produce
//! exactly the numbers the first one would have.

use chacha20::ChaCha20Rng;
use chacha20::rand_core::{Rng, SeedableRng};
use std::fmt;

use crate::frame::ClientId;

/// The 256-bit key of a session's number sequence. Whoever knows it can
/// predict the whole sequence, so it is redacted from debug output.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionSeed(pub [u8; 32]);

impl fmt::Debug for SessionSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionSeed(<redacted>)")
    }
}

/// Domain separator for [`SessionSeed::derive`], so derived keys cannot
/// collide with keys derived for any other purpose.
const DERIVE_DOMAIN: &[u8; 8] = b"nmstrm-1";

impl SessionSeed {
    /// Deterministic seed for reproducible runs (`--seed`): the first 32
    /// keystream bytes of ChaCha20 keyed by
    /// `master.to_le_bytes() || client_id bytes || "nmstrm-1"`.
    ///
    /// The same master seed and client id give the same session on every run
    /// and every server instance.
    pub fn derive(master: u64, client_id: ClientId) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&master.to_le_bytes());
        key[8..24].copy_from_slice(client_id.as_bytes());
        key[24..].copy_from_slice(DERIVE_DOMAIN);
        let mut seed = [0u8; 32];
        ChaCha20Rng::from_seed(key).fill_bytes(&mut seed);
        Self(seed)
    }
}

/// Number `index` of the session keyed by `seed`, in O(1).
pub fn number_at(seed: &SessionSeed, index: u16) -> u32 {
    NumberGenerator::starting_at(seed, index).next_number()
}

/// Sequential reader of a session's numbers from any starting index. Cheaper
/// than repeated [`number_at`] calls: ChaCha produces several blocks per
/// refill, and sequential reads consume them all.
pub struct NumberGenerator {
    rng: ChaCha20Rng,
}

impl fmt::Debug for NumberGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NumberGenerator")
            .field("word_pos", &self.rng.get_word_pos())
            .finish_non_exhaustive()
    }
}

impl NumberGenerator {
    pub fn starting_at(seed: &SessionSeed, index: u16) -> Self {
        let mut rng = ChaCha20Rng::from_seed(seed.0);
        rng.set_word_pos(u128::from(index));
        Self { rng }
    }

    /// The number at the current index; advances to the next index.
    pub fn next_number(&mut self) -> u32 {
        self.rng.next_u32()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Test vector from PROTOCOL.md: the all-zero key gives the well-known
    /// ChaCha20 zero-key keystream (RFC 8439 appendix A.1, test vector #1:
    /// `76 b8 e0 ad a0 f1 3d 90 ...`), read as little-endian words.
    #[test]
    fn zero_seed_matches_rfc8439_keystream() {
        let seed = SessionSeed([0; 32]);
        assert_eq!(number_at(&seed, 0), 0xade0_b876);
        assert_eq!(number_at(&seed, 1), 0x903d_f1a0);
        assert_eq!(number_at(&seed, 15), 0x8665_eeb2);
        // word 16 is the first word of block 1 (RFC 8439 A.1 test vector #2)
        assert_eq!(number_at(&seed, 16), 0xbee7_079f);
    }

    #[test]
    fn seed_debug_is_redacted() {
        // Exactly the redacted form: a derived Debug would print the key.
        let seed = SessionSeed([0xab; 32]);
        assert_eq!(format!("{seed:?}"), "SessionSeed(<redacted>)");
        assert_eq!(format!("{seed:#?}"), "SessionSeed(<redacted>)");
    }

    #[test]
    fn derived_seeds_depend_on_master_and_client() {
        let a = ClientId::from_bytes([1; 16]);
        let b = ClientId::from_bytes([2; 16]);
        assert_eq!(SessionSeed::derive(7, a), SessionSeed::derive(7, a));
        assert_ne!(SessionSeed::derive(7, a), SessionSeed::derive(8, a));
        assert_ne!(SessionSeed::derive(7, a), SessionSeed::derive(7, b));
    }

    proptest! {
        #[test]
        fn random_access_equals_sequential_run(seed in any::<[u8; 32]>(), start in 0u16..1000, len in 1usize..200) {
            let seed = SessionSeed(seed);
            let mut sequential = NumberGenerator::starting_at(&seed, 0);
            let values: Vec<u32> = (0..(start as usize + len)).map(|_| sequential.next_number()).collect();
            let mut from_start = NumberGenerator::starting_at(&seed, start);
            for (offset, expected) in values[start as usize..].iter().enumerate() {
                prop_assert_eq!(from_start.next_number(), *expected);
                prop_assert_eq!(number_at(&seed, start + offset as u16), *expected);
            }
        }
    }
}
