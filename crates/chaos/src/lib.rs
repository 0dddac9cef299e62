//! Fault injection for numstream.
//!
//! - [`plan`]: what is done to each connection, drawn from a seeded
//!   [`plan::Schedule`], so any run replays from its seed.
//! - [`proxy`]: the harness's [`proxy::FaultProxy`], a loopback-only TCP
//!   proxy that applies those plans: close (FIN) or reset (RST) at a byte
//!   or a moment, stalls in one or both directions, added latency, 1-byte
//!   writes, half-closes.
//! - [`attack`]: [`attack::Attacker`], an abusive client (connection hog,
//!   open-and-drop churn, handshake slowloris) from source addresses of its
//!   own, run beside the honest clients.
//! - [`starve`]: the starve fault, a live server throttled by SIGSTOP/SIGCONT
//!   duty cycles (a CPU quota, a noisy neighbour).
//! - [`run`]: the chaos run: real `numstream-server` processes, killed and
//!   restarted and starved, clients in-process behind proxies (each from its own source
//!   address), an attacker beside them, every client's result checked
//!   against the fault-free reference.
//!
//! The binaries `numstream-chaos-proxy` and `numstream-chaos` are thin
//! command lines over these.

pub mod attack;
pub mod plan;
pub mod run;
pub mod servers;
pub mod starve;

pub use attack::{AttackConfig, AttackKind, AttackPlan, AttackReport, Attacker};
pub use numstream_harness::proxy;
pub use plan::{ConnectionPlan, Fault, FaultKind, FaultProfile, Schedule};
pub use proxy::{FaultProxy, ProxyError};
