//! A loopback address that refuses every connection for as long as its guard lives: the "sandbox
//! that is down" of the tests. Binding a port and dropping the listener is not enough: tests run
//! in parallel in one process, and the kernel hands the freed port to the next `bind(0)`, so the
//! "dead" route then reaches some other test's server (CI saw a gRPC call meant for a refused
//! port answered `Unimplemented` by another test's server). Here the socket stays bound but never
//! listens: the kernel answers each SYN with a reset, and, because the socket does not set
//! `SO_REUSEADDR`, nobody else can bind the port meanwhile.

use std::net::SocketAddr;
use tokio::net::TcpSocket;

pub struct RefusedPort {
    pub addr: SocketAddr,
    _socket: TcpSocket,
}

impl RefusedPort {
    /// Reserves a free loopback port on which nothing will ever listen.
    pub fn new() -> std::io::Result<RefusedPort> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = socket.local_addr()?;
        Ok(RefusedPort {
            addr,
            _socket: socket,
        })
    }
}
