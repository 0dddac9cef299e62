//! Fault injection for numstream.
//!
//! - [`plan`]: what is done to each connection, drawn from a seeded
//!   [`plan::Schedule`], so any run replays from its seed.
//! - [`proxy`]: [`proxy::ChaosProxy`], a loopback-only TCP proxy that applies
//!   those plans: close (FIN) or reset (RST) at a byte or a moment, stalls
//!   in one or both directions, added latency, 1-byte writes, half-closes.
//! - [`run`]: the chaos run: real `numstream-server` processes, killed and
//!   restarted, clients in-process behind proxies, every result checked
//!   against the fault-free reference.
//!
//! The binaries `numstream-chaos-proxy` and `numstream-chaos` are thin
//! command lines over these.

pub mod plan;
pub mod proxy;
pub mod run;
pub mod servers;

pub use plan::{ConnectionPlan, Fault, FaultKind, FaultProfile, Schedule};
pub use proxy::{ChaosProxy, ProxyError};
