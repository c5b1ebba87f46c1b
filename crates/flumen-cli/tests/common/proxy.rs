//! A loopback TCP proxy for simulating a broker outage: a client pointed at the
//! proxy's port reaches the target through it until [`Proxy::pause`], which refuses
//! new connections and cuts the open ones, and again after [`Proxy::resume`], which
//! listens on the same port once more. Dropping the proxy stops everything.
#![allow(dead_code)] // only the outage tests use it

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// The accept task (while accepting) and every connection task it started.
#[derive(Default)]
struct State {
    accept: Option<JoinHandle<()>>,
    connections: Vec<AbortHandle>,
    /// Set when the proxy is dropped: a connection accepted just then is cut at once.
    dropped: bool,
}

/// A TCP proxy from `127.0.0.1:port` to a target address.
pub struct Proxy {
    port: u16,
    target: SocketAddr,
    state: Arc<Mutex<State>>,
}

/// How long [`Proxy::start`] and [`Proxy::resume`] keep trying to bind the port.
const BIND_LIMIT: Duration = Duration::from_secs(10);

impl Proxy {
    /// Listens on `127.0.0.1:listen_port` and forwards each connection to `target`.
    pub async fn start(listen_port: u16, target: SocketAddr) -> Proxy {
        let proxy = Proxy {
            port: listen_port,
            target,
            state: Arc::new(Mutex::new(State::default())),
        };
        proxy.listen().await;
        proxy
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops accepting (the port refuses connections) and cuts every open connection.
    pub async fn pause(&self) {
        let task = lock(&self.state).accept.take();
        if let Some(task) = task {
            task.abort();
            // Once the aborted task has finished, its listener is closed and every
            // connection it accepted is in `connections`.
            let _ = task.await;
        }
        for connection in lock(&self.state).connections.drain(..) {
            connection.abort();
        }
    }

    /// Listens on the same port again (retrying the bind for up to 10 s) and accepts.
    pub async fn resume(&self) {
        let accepting = lock(&self.state).accept.is_some();
        if !accepting {
            self.listen().await;
        }
    }

    /// Binds the port, retrying for a while, and starts the accept task.
    async fn listen(&self) {
        let deadline = Instant::now() + BIND_LIMIT;
        let listener = loop {
            match bind(self.port) {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("proxy: binding 127.0.0.1:{}: {e}; trying again", self.port);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("proxy cannot bind 127.0.0.1:{}: {e}", self.port),
            }
        };
        let task = tokio::spawn(accept_loop(listener, self.target, Arc::clone(&self.state)));
        lock(&self.state).accept = Some(task);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        state.dropped = true;
        if let Some(task) = state.accept.take() {
            task.abort();
        }
        for connection in state.connections.drain(..) {
            connection.abort();
        }
    }
}

/// The state, even if a panicking thread held it.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A listener on `127.0.0.1:port` with SO_REUSEADDR, so the port can be bound again
/// while connections cut by a pause linger in TIME_WAIT.
fn bind(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(1024)
}

/// Accepts until aborted; each connection is copied both ways by its own task.
async fn accept_loop(listener: TcpListener, target: SocketAddr, state: Arc<Mutex<State>>) {
    loop {
        let mut inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Transient (a connection reset before it was accepted, or out of
                // file descriptors): wait a little rather than spin.
                eprintln!("proxy: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let connection = tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return; // dropping `inbound` closes the client's connection
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
        let mut guard = lock(&state);
        if guard.dropped {
            connection.abort();
            return;
        }
        guard.connections.retain(|c| !c.is_finished());
        guard.connections.push(connection.abort_handle());
    }
}
