//! The sandbox-gateway test harness, shared by the end-to-end tests (`tests/tests`), the load
//! harness (`benches`) and the demo (`tests/demo`): the real Envoy 1.40 runner, local sandbox
//! servers (echo, SSE, WebSocket, gRPC), a raw HTTP client that can send hostile bytes, the
//! sandbox-extproc runner, routes-file helpers, and real third-party sandbox software in Python
//! (`python`: MCP servers and the MCP SDK's client). The fake Kubernetes API server is its own
//! crate (`tests/apiserver`), usable without Envoy.

#![forbid(unsafe_code)]

pub mod client;
pub mod envoy;
pub mod extproc;
pub mod gateway;
pub mod grpc;
pub mod hung;
pub mod kubelet;
pub mod loopback;
pub mod python;
pub mod refused;
pub mod sandbox;
