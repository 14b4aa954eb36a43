//! Test support for sandbox-gateway: a local "sandbox" upstream server used by
//! the demo, the end-to-end tests and the benchmarks.

pub mod cases;
pub mod client;
pub mod envoy;
pub mod extproc;
pub mod fake_apiserver;
pub mod gateway;
pub mod sandbox;
