//! Where a session's keys and takeover channel live: one Redis, or slot
//! groups on a Redis Cluster.
//!
//! On one Redis, every session is `{prefix}session:{<client id>}`, the
//! deployment has one index, `{prefix}sessions`, and one takeover channel,
//! `{prefix}takeovers`; a script may touch any of them.
//!
//! On a Redis Cluster a script may only touch keys of one hash slot, and
//! every script that moves a deadline touches the session *and* its index
//! entry. So the deployment is cut into [`CLUSTER_GROUPS`] *groups*, each
//! pinned to one slot by a hash tag chosen here (`{<tag>}`): a session of
//! group `g` is `{prefix}session:{<tag g>}:<client id>`, its index is
//! `{prefix}sessions:{<tag g>}` and its takeover channel the shard channel
//! `{prefix}takeovers:{<tag g>}` (SPUBLISH), all in the same slot. The
//! group is a function of the client id alone, so every server of the
//! deployment agrees on it. The tags are picked so that the groups' slots
//! are evenly spaced over the 16384 slots: `redis-cli --cluster create`
//! and rebalancing give each master a contiguous range, so the groups (and
//! so the sessions) spread evenly over the masters.
//!
//! The bound then holds per group (ARCHITECTURE.md, "On a Redis Cluster"): each
//! group admits `ceil(max_sessions / groups)` sessions.

use std::fmt::Write as _;

use numstream_protocol::ClientId;

/// Groups on a cluster. Part of the key layout: every server of one
/// deployment must use the same number. 64 spreads within 5% over 3
/// masters (21, 22 and 21 groups) and keeps a group's share of a 100,000 bound
/// (1,563) large enough that the first refusal comes late (at what share of
/// the bound: ARCHITECTURE.md, "On a Redis Cluster").
pub const CLUSTER_GROUPS: usize = 64;

/// Redis Cluster's hash slots.
const SLOTS: u16 = 16_384;

/// One group's index key and takeover channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub(crate) index_key: String,
    pub(crate) channel: String,
    /// `{<tag>}:` on a cluster, empty on one Redis: what goes between
    /// `session:` and the client id (where on one Redis the client id is
    /// its own tag).
    tag: Option<String>,
}

/// The key layout of one store (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    prefix: String,
    groups: Vec<Group>,
    cluster: bool,
}

impl Layout {
    pub(crate) fn single(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            groups: vec![Group {
                index_key: format!("{prefix}sessions"),
                channel: format!("{prefix}takeovers"),
                tag: None,
            }],
            cluster: false,
        }
    }

    pub(crate) fn cluster(prefix: &str) -> Self {
        let groups = slot_tags(CLUSTER_GROUPS)
            .into_iter()
            .map(|tag| Group {
                index_key: format!("{prefix}sessions:{{{tag}}}"),
                channel: format!("{prefix}takeovers:{{{tag}}}"),
                tag: Some(tag),
            })
            .collect();
        Self {
            prefix: prefix.to_owned(),
            groups,
            cluster: true,
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster
    }

    pub(crate) fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The index of `client_id`'s group in [`groups`](Self::groups).
    pub(crate) fn group_of(&self, client_id: ClientId) -> usize {
        let bytes = client_id.as_bytes();
        usize::from(u16::from_be_bytes([bytes[0], bytes[1]])) % self.groups.len()
    }

    pub(crate) fn group(&self, client_id: ClientId) -> &Group {
        &self.groups[self.group_of(client_id)]
    }

    pub(crate) fn session_key(&self, client_id: ClientId) -> String {
        let mut key = format!("{}session:", self.prefix);
        // Writing to a String cannot fail.
        let _ = match &self.group(client_id).tag {
            None => write!(key, "{{{client_id}}}"),
            Some(tag) => write!(key, "{{{tag}}}:{client_id}"),
        };
        key
    }

    /// The hash slot of `client_id`'s keys on a cluster; `None` on one
    /// Redis.
    pub(crate) fn slot_of(&self, client_id: ClientId) -> Option<u16> {
        let tag = self.group(client_id).tag.as_ref()?;
        Some(slot(tag.as_bytes()))
    }

    /// The command the attach script announces a takeover with: a shard
    /// channel on a cluster stays within the slot's master and replicas,
    /// where PUBLISH would be broadcast over the whole cluster bus.
    pub(crate) fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }

    /// Sessions each group admits under a deployment bound of `max`.
    pub(crate) fn group_bound(&self, max: usize) -> usize {
        max.div_ceil(self.groups.len())
    }
}

/// `count` hash tags whose slots are evenly spaced over the slot space:
/// tag `g` hashes to the middle of the `g`th of `count` equal slot ranges.
/// Short decimal strings, found by one pass over 0, 1, 2, … (each slot is
/// hit by about one number in 16384).
fn slot_tags(count: usize) -> Vec<String> {
    let width = usize::from(SLOTS) / count;
    let targets: Vec<u16> = (0..count)
        .map(|group| u16::try_from(group * width + width / 2).unwrap_or(0))
        .collect();
    let mut tags: Vec<Option<String>> = vec![None; count];
    let mut missing = count;
    let mut candidate: u64 = 0;
    while missing > 0 {
        let text = candidate.to_string();
        let slot = slot(text.as_bytes());
        if let Some(group) = targets.iter().position(|&target| target == slot)
            && tags[group].is_none()
        {
            tags[group] = Some(text);
            missing -= 1;
        }
        candidate += 1;
    }
    tags.into_iter().flatten().collect()
}

/// The hash slot of a key with no braces (or of a tag's contents): CRC16
/// (XMODEM) modulo 16384, as Redis Cluster computes it.
pub(crate) fn slot(key: &[u8]) -> u16 {
    crc16(key) % SLOTS
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_and_slots_match_the_redis_cluster_specification() {
        // The check value the Redis Cluster specification gives.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        // `CLUSTER KEYSLOT foo` and `bar` on Redis 7.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
    }

    #[test]
    fn cluster_groups_sit_on_evenly_spaced_slots_of_their_own() {
        let tags = slot_tags(CLUSTER_GROUPS);
        assert_eq!(tags.len(), CLUSTER_GROUPS);
        let slots: Vec<u16> = tags.iter().map(|tag| slot(tag.as_bytes())).collect();
        for (group, &slot) in slots.iter().enumerate() {
            assert_eq!(usize::from(slot), group * 256 + 128, "group {group}");
        }
        // Over the three ranges `redis-cli --cluster create` gives three
        // masters (0-5460, 5461-10922, 10923-16383): 21, 22 and 21 groups.
        let per_master: Vec<usize> = (0..3)
            .map(|master| {
                let range =
                    (usize::from(SLOTS) * master / 3)..(usize::from(SLOTS) * (master + 1) / 3);
                slots
                    .iter()
                    .filter(|&&slot| range.contains(&usize::from(slot)))
                    .count()
            })
            .collect();
        assert_eq!(per_master, [21, 22, 21]);
    }

    #[test]
    fn a_session_shares_its_slot_with_its_index_and_channel() {
        let layout = Layout::cluster("numstream:");
        let tag_slot = |key: &str| {
            let open = key.find('{').expect("a hash tag");
            let close = key[open..].find('}').expect("a closed tag") + open;
            slot(&key.as_bytes()[open + 1..close])
        };
        let mut groups_seen = std::collections::HashSet::new();
        for byte in 0..=255u8 {
            let id = ClientId::from_bytes([byte; 16]);
            let group = layout.group(id);
            let key = layout.session_key(id);
            assert!(key.starts_with("numstream:session:{"), "{key}");
            assert!(key.ends_with(&id.to_string()), "{key}");
            assert_eq!(tag_slot(&key), tag_slot(&group.index_key));
            assert_eq!(tag_slot(&key), tag_slot(&group.channel));
            groups_seen.insert(layout.group_of(id));
        }
        assert!(groups_seen.len() > CLUSTER_GROUPS / 2, "{groups_seen:?}");
    }

    #[test]
    fn one_redis_keeps_the_single_layout() {
        let layout = Layout::single("p:");
        let id = ClientId::from_bytes([3; 16]);
        assert_eq!(layout.session_key(id), format!("p:session:{{{id}}}"));
        assert_eq!(layout.group(id).index_key, "p:sessions");
        assert_eq!(layout.group(id).channel, "p:takeovers");
        assert_eq!(layout.publish_command(), "PUBLISH");
        assert_eq!(layout.group_bound(7), 7);
        assert_eq!(Layout::cluster("p:").group_bound(100_000), 1_563);
    }
}
