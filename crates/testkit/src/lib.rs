//! Test tooling shared by numstream's crates: in-process servers and a raw
//! protocol client, from any loopback source address (`server`), a GET for
//! the status endpoint (`http`), a TCP proxy that cuts connections on
//! command (`proxy`), real external services started on free ports
//! (`redis`, and a local Redis Cluster of them in `redis_cluster`), real
//! server processes to kill (`process`), and certificates made at run
//! time for the TLS tests (`tls`).
//! Never a dependency of production code.

pub mod http;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod redis_cluster;
pub mod server;
pub mod tls;
