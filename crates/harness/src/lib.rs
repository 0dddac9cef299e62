//! Test and fault-injection tooling shared by numstream's crates:
//!
//! - `raw`: a protocol client that sends exactly the bytes it is given,
//!   from any loopback source address;
//! - `fake_server`: a scripted fake server for the client's tests;
//! - `proxy`: a loopback proxy that injects faults, with its decisions as a
//!   pure state machine in `fault`;
//! - `process`: real server processes (`--port 0`, signals by syscall);
//! - `redis`, `redis_cluster`: real redis-server instances and a local
//!   Redis Cluster;
//! - `http`: a GET for the status endpoint;
//! - `tls`: certificates made at run time;
//! - `wait`: waiting for an observable condition instead of sleeping.
//!
//! Depends on no numstream crate but the protocol, so any crate's tests
//! (and the chaos and bench tools) can use it without a dependency cycle;
//! never a dependency of the server or client libraries.

pub mod fake_server;
pub mod fault;
pub mod http;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod redis;
pub mod redis_cluster;
pub mod tls;
pub mod wait;
