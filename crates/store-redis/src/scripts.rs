//! The Lua scripts that make each session operation one atomic step on
//! Redis, and the key layout they work on.
//!
//! A script touches the session's hash (the client id is its hash tag) and
//! the deployment's session index, both passed in `KEYS` as Redis requires.
//! A script answers with an array whose first element is a status word
//! (`ok`, `exists`, `full`, `not_found`, `bad_token`, `superseded`,
//! `corrupt`) followed by that status's values (`RENEW_MANY`: an array of
//! one such reply per session, a renewed one as the bare word `ok`);
//! `reply.rs` turns it into Rust types. Scripts return only strings and
//! integers: Lua booleans would reach a RESP3 client as booleans and a
//! RESP2 one as nil, and nil also cuts a Lua array short.
//!
//! Hash fields: `seed` (32 raw bytes), `count` (decimal), `token_sha256`
//! (32 raw bytes), `checksum` (decimal CRC-32C of the whole sequence),
//! `generation` (decimal, from 1), `attached` (`1`/`0`). The key's own
//! expiry is the session's deadline: the lease while attached, the
//! disconnection TTL once detached, so Redis forgets expired sessions by
//! itself and no sweeper is needed.
//!
//! The index, `{prefix}sessions`, is a sorted set of client ids, each
//! scored with its session key's expiry (milliseconds on Redis's clock,
//! from `TIME`): every script that sets an expiry sets the same instant as
//! the score (`PEXPIREAT`, then `ZADD`), and `COMPLETE` removes the entry
//! with the key. Redis keeps a key while now <= its expiry, so the entries
//! scored at or after now are exactly the live sessions, whether or not
//! Redis has deleted the expired keys yet: `CREATE` drops the older entries
//! and refuses past the deployment's bound, and `OCCUPANCY` counts.
//!
//! Besides these keys there is one pub/sub channel, `{prefix}takeovers`,
//! on which `ATTACH` announces every new generation.

use redis::Script;

/// Loads and validates the generation every fenced operation compares with
/// the caller's. Compared as strings, so it must be canonical decimal (what
/// HINCRBY writes); a generation Redis cannot have written is corruption.
/// `EXISTS` only when the field is missing, to tell a missing session from
/// a damaged one: a renewal batch runs this for every session in it. A
/// small saving, measured: in issue 15's 100,000-session run with Redis
/// short of CPU, 293,000 fewer `EXISTS` calls, but the key's lookup moved
/// to `HGET` (39 µs a call instead of 19), so Redis's time in the two fell
/// from 12.7 s to 11.9 s of the run's 89 s in scripts.
macro_rules! generation_prelude {
    () => {
        r#"
local function current_generation(key)
  local generation = redis.call('HGET', key, 'generation')
  if not generation and redis.call('EXISTS', key) == 0 then
    return nil, {'not_found'}
  end
  if not generation or not string.match(generation, '^[1-9][0-9]*$') then
    return nil, {'corrupt', 'generation is missing or not a positive integer'}
  end
  return generation
end
"#
    };
}

/// Redis's clock and the one way a script sets a session's deadline: the
/// key's expiry and its index score are the same instant, so the index
/// counts a session exactly as long as Redis keeps it. `set_deadlines`
/// does it for many sessions with one `ZADD` of all their members (in
/// chunks of 500, well within the Lua stack `unpack` fills): with plain
/// `ok` replies, that made a renewal 13% cheaper for Redis (a median of
/// 19.5 µs a session before, 17.0 after, with 100,000 sessions indexed;
/// BENCHMARKS.md, "The 100,000-session rows on today's machine").
///
/// `TIME` rather than the servers' clocks: Redis expires keys by its own
/// clock, and every instance reads the same one. (Since Redis 5, scripts
/// replicate their effects, so the non-deterministic `TIME` may precede
/// writes; `PEXPIREAT` carries the absolute deadline to replicas.)
macro_rules! deadline_prelude {
    () => {
        r#"
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local function ms_text(ms)
  return string.format('%.0f', ms)
end
local function set_deadlines(index, keys, members, now, duration_ms)
  local deadline = ms_text(now + tonumber(duration_ms))
  local scored = {}
  for i = 1, #keys do
    redis.call('PEXPIREAT', keys[i], deadline)
    scored[#scored + 1] = deadline
    scored[#scored + 1] = members[i]
    if #scored == 1000 or i == #keys then
      redis.call('ZADD', index, unpack(scored))
      scored = {}
    end
  end
end
local function set_deadline(index, key, member, now, duration_ms)
  set_deadlines(index, {key}, {member}, now, duration_ms)
end
"#
    };
}

/// KEYS[1] session, KEYS[2] index; ARGV seed, count, token digest,
/// checksum, lease ms, client id, the index's bound, the deployment's
/// bound (for the reply). Replies `ok`, `exists` or `full, <bound>`. On one
/// Redis both bounds are the same; on a cluster the index is the session's
/// group's and its bound the group's share (see `layout`).
///
/// An expired session's key is already gone, so "exists" means "alive".
/// Index entries scored before now belong to sessions Redis no longer
/// keeps; dropping them here, in the only script that adds sessions, keeps
/// the index no larger than the bound plus what expired since the last
/// create.
const CREATE: &str = concat!(
    deadline_prelude!(),
    r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists'}
end
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ms_text(now))
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[7]) then
  return {'full', ARGV[8]}
end
redis.call('HSET', KEYS[1], 'seed', ARGV[1], 'count', ARGV[2], 'token_sha256', ARGV[3],
  'checksum', ARGV[4], 'generation', '1', 'attached', '1')
set_deadline(KEYS[2], KEYS[1], ARGV[6], now, ARGV[5])
return {'ok'}
"#
);

/// KEYS[1] session, KEYS[2] index; ARGV token digest, lease ms, takeover
/// channel, client id, publishing command. Replies `ok, seed, count,
/// generation, checksum` (`checksum` empty for a record written before the
/// field existed), and publishes `"<client id> <generation>"` on the
/// takeover channel in the same atomic step, so every server learns of the
/// new owner within the pub/sub latency (see `notices`). The command is
/// PUBLISH on one Redis and SPUBLISH on a cluster, where the channel is a
/// shard channel in the session's slot: a PUBLISH would be broadcast over
/// the cluster bus to every node, an SPUBLISH reaches only the slot's
/// master and replicas (and their subscribers).
///
/// The token check happens here rather than in Rust so that check and
/// generation bump are one atomic step with one round trip: comparing in
/// Rust would need a read, then a compare-and-set conditioned on the
/// generation read, retried whenever a concurrent attach got in between.
/// What is compared is SHA-256 of the token, never the token (see
/// `token_digest`), and the loop visits every byte whatever the first
/// difference, so its timing says nothing useful.
///
/// Like every script that moves a deadline, it `ZADD`s rather than updates
/// only an existing index entry: a live session missing from the index (a
/// record from before the index existed) is counted again from its next
/// attach, renewal or detach.
const ATTACH: &str = concat!(
    generation_prelude!(),
    deadline_prelude!(),
    r#"
local generation, early = current_generation(KEYS[1])
if not generation then
  return early
end
local record = redis.call('HMGET', KEYS[1], 'token_sha256', 'seed', 'count', 'checksum')
local stored, seed, count, checksum = record[1], record[2], record[3], record[4]
if not stored or not seed or not count then
  return {'corrupt', 'token_sha256, seed or count is missing'}
end
local offered = ARGV[1]
if #stored ~= #offered then
  return {'bad_token'}
end
local difference = 0
for i = 1, #stored do
  difference = bit.bor(difference, bit.bxor(string.byte(stored, i), string.byte(offered, i)))
end
if difference ~= 0 then
  return {'bad_token'}
end
local next_generation = redis.call('HINCRBY', KEYS[1], 'generation', 1)
redis.call('HSET', KEYS[1], 'attached', '1')
set_deadline(KEYS[2], KEYS[1], ARGV[4], now_ms(), ARGV[2])
redis.call(ARGV[5], ARGV[3], ARGV[4] .. ' ' .. next_generation)
return {'ok', seed, count, next_generation, checksum or ''}
"#
);

/// The check every fenced write starts with: `key` must exist with a valid
/// generation equal to `claimed` (the caller's). `refused` returns nil when
/// it does, else the reply saying why not (`not_found`, `corrupt`,
/// `superseded`).
macro_rules! fenced_prelude {
    () => {
        concat!(
            generation_prelude!(),
            r#"
local function refused(key, claimed)
  local generation, early = current_generation(key)
  if not generation then
    return early
  end
  if generation ~= claimed then
    return {'superseded', generation}
  end
  return nil
end
"#
        )
    };
}

/// KEYS[1] session, KEYS[2] index; ARGV generation, lease ms, client id.
///
/// Leaves `attached` alone, like the in-memory store: a renewal only moves
/// the deadline of whatever the caller's generation owns.
const RENEW: &str = concat!(
    fenced_prelude!(),
    deadline_prelude!(),
    r#"
local refusal = refused(KEYS[1], ARGV[1])
if refusal then
  return refusal
end
set_deadline(KEYS[2], KEYS[1], ARGV[3], now_ms(), ARGV[2])
return {'ok'}
"#
);

/// KEYS[1] index, then the sessions; ARGV[1] lease ms, then for the
/// session in KEYS[i + 1] the generation claimed for it (ARGV[2i]) and its
/// client id (ARGV[2i + 1]). Replies one reply per session, in order: the
/// plain string `ok` for a renewed lease (not RENEW's one-element array,
/// which cost Redis a table and a nested reply per session), else RENEW's
/// refusal. A server renews all its leases due at once in one round trip.
///
/// On a cluster every key must be in one slot: the store sends one call
/// per group (see `layout`).
const RENEW_MANY: &str = concat!(
    fenced_prelude!(),
    deadline_prelude!(),
    r#"
local replies = {}
local renewed_keys = {}
local renewed_members = {}
for i = 2, #KEYS do
  local key = KEYS[i]
  local refusal = refused(key, ARGV[2 * i - 2])
  if refusal then
    replies[i - 1] = refusal
  else
    renewed_keys[#renewed_keys + 1] = key
    renewed_members[#renewed_members + 1] = ARGV[2 * i - 1]
    replies[i - 1] = 'ok'
  end
end
if #renewed_keys > 0 then
  set_deadlines(KEYS[1], renewed_keys, renewed_members, now_ms(), ARGV[1])
end
return replies
"#
);

/// KEYS[1] session, KEYS[2] index; ARGV generation, ttl ms, client id.
/// The TTL replaces the lease as the key's expiry in the same step that
/// marks the session detached.
const DETACH: &str = concat!(
    fenced_prelude!(),
    deadline_prelude!(),
    r#"
local refusal = refused(KEYS[1], ARGV[1])
if refusal then
  return refusal
end
redis.call('HSET', KEYS[1], 'attached', '0')
set_deadline(KEYS[2], KEYS[1], ARGV[3], now_ms(), ARGV[2])
return {'ok'}
"#
);

/// KEYS[1] session, KEYS[2] index; ARGV generation, client id.
const COMPLETE: &str = concat!(
    fenced_prelude!(),
    r#"
local refusal = refused(KEYS[1], ARGV[1])
if refusal then
  return refusal
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return {'ok'}
"#
);

/// KEYS[1] session. Replies `ok, count, generation, attached, pttl`.
///
/// A script rather than HMGET then PTTL so the expiry read belongs to the
/// same state as the fields (a detach in between would pair `attached=1`
/// with the detach TTL). Reads only what `SessionInfo` needs: the seed and
/// token digest stay in Redis.
const LOOKUP: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'not_found'}
end
local record = redis.call('HMGET', KEYS[1], 'count', 'generation', 'attached')
if not record[1] or not record[2] or not record[3] then
  return {'corrupt', 'count, generation or attached is missing'}
end
return {'ok', record[1], record[2], record[3], redis.call('PTTL', KEYS[1])}
"#;

/// KEYS[1] index. Replies the number of live sessions: the entries scored
/// at or after now (see the module docs). Reads only, so a readiness probe
/// or scrape never changes the index.
const OCCUPANCY: &str = concat!(
    deadline_prelude!(),
    r#"
return redis.call('ZCOUNT', KEYS[1], ms_text(now_ms()), '+inf')
"#
);

/// The scripts, each hashed once; `Script::invoke_async` sends EVALSHA and
/// falls back to loading the script when Redis answers NOSCRIPT (after a
/// restart or SCRIPT FLUSH).
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) create: Script,
    pub(crate) attach: Script,
    pub(crate) renew: Script,
    pub(crate) renew_many: Script,
    pub(crate) detach: Script,
    pub(crate) complete: Script,
    pub(crate) lookup: Script,
    pub(crate) occupancy: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            create: Script::new(CREATE),
            attach: Script::new(ATTACH),
            renew: Script::new(RENEW),
            renew_many: Script::new(RENEW_MANY),
            detach: Script::new(DETACH),
            complete: Script::new(COMPLETE),
            lookup: Script::new(LOOKUP),
            occupancy: Script::new(OCCUPANCY),
        }
    }
}
