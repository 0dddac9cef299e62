//! Test tooling shared by numstream's crates: in-process servers and a raw
//! protocol client (`server`), a TCP proxy that cuts connections on command
//! (`proxy`), and real external services started on free ports (`redis`).
//! Never a dependency of production code.

pub mod proxy;
pub mod redis;
pub mod server;
