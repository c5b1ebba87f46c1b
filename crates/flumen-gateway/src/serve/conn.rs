//! The HTTP listener's connections, plain or TLS: how many may be open at once, and
//! how long one may take to send its request's headers — which is also how long an
//! idle keep-alive connection is kept, hyper's header timer starting whenever a
//! connection waits for a request. (The body's deadline is `http::read_body`'s.)
//!
//! A connection over `max_connections` is answered at once with a 503 that says so
//! and closed (over TLS, closed at once: no handshake is spent on it), rather than
//! left unanswered; accept errors (out of file descriptors, a connection reset
//! before it was accepted) are waited out, never the listener's end. A client that
//! stops reading its answers loses its connection after `write_timeout` without
//! progress. On stop, the listener closes, each connection answers the requests it
//! has in flight (idle ones close), and [`serve`] returns once they have, or after
//! `grace`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The listener's limits (`[server]`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// From waiting for a request (a new connection, or a kept-alive one after its
    /// last answer) to having its whole header; also the TLS handshake's limit.
    pub header_timeout: Duration,
    /// Connections open at once; more are refused with a 503.
    pub max_connections: usize,
    /// How long a write may wait for the client to read.
    pub write_timeout: Duration,
    /// How long a stop waits for the requests in flight.
    pub grace: Duration,
}

/// Refusals written at once, at most: past that, connections over the limit are
/// closed without an answer.
const REFUSING: usize = 64;

/// What an accepted TCP connection goes through before HTTP: nothing, or TLS.
pub(super) trait Handshake: Clone + Send + Sync + 'static {
    /// The stream HTTP is served on.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Plain HTTP: a connection over the limit can be answered without a handshake.
    const CLEAR: bool;

    /// The connection, ready for HTTP.
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

/// Plain HTTP.
#[derive(Clone, Copy)]
pub(super) struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;

    const CLEAR: bool = true;

    async fn handshake(&self, tcp: TcpStream) -> std::io::Result<TcpStream> {
        Ok(tcp)
    }
}

/// Accepts connections and serves `app` on each until `stopped`, within `limits`.
pub(super) async fn serve<H: Handshake>(
    listener: TcpListener,
    handshake: H,
    app: Router,
    limits: Limits,
    stopped: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    tokio::pin!(stopped);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // EMFILE, ENFILE, ECONNABORTED…: the listener itself is fine.
                    tracing::warn!(error = %e, "flumen serve: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            // Over the limit: answered in the clear, and only so many at once.
            if let (true, Ok(refusal)) = (H::CLEAR, Arc::clone(&refusing).try_acquire_owned()) {
                tokio::spawn(async move {
                    refuse(tcp, limits.max_connections).await;
                    drop(refusal);
                });
            }
            continue;
        };
        let (handshake, app, watcher) = (handshake.clone(), app.clone(), graceful.watcher());
        tokio::spawn(async move {
            let io =
                match tokio::time::timeout(limits.header_timeout, handshake.handshake(tcp)).await {
                    Ok(Ok(io)) => io,
                    // A failed or stalled handshake concerns that connection only.
                    _ => return,
                };
            let io = WriteTimeout {
                io,
                timeout: limits.write_timeout,
                stalled: None,
            };
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let connection = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
            let _ = watcher.watch(connection).await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "flumen serve: stopped with requests still in flight after {:?}",
            limits.grace
        );
    }
    Ok(())
}

/// A stream whose writes give up after `timeout` without progress, so that a client
/// that stops reading its answers loses its connection instead of holding it.
struct WriteTimeout<Io> {
    io: Io,
    timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<Io> WriteTimeout<Io> {
    /// `poll`'s result, or a timeout error once writes have waited `timeout`.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not read its answer in time",
            )));
        }
        Poll::Pending
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for WriteTimeout<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.timed(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.timed(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.timed(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Answers a connection over the limit with a 503 before reading its request, then
/// reads what the client sent (for at most a second) so that closing does not reset
/// the connection before the client has read the answer.
async fn refuse<Io: AsyncRead + AsyncWrite + Unpin>(mut io: Io, max: usize) {
    let body = serde_json::json!({"error": {
        "message": format!("too many connections: this gateway serves at most {max} at once (server.max_connections); retry later"),
        "type": "server_error", "param": null, "code": "too_many_connections"}})
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        io.write_all(answer.as_bytes()).await?;
        io.shutdown().await?;
        let mut sink = [0u8; 4096];
        while io.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// The gRPC listener's connections, for tonic: at most `max_connections` open (one
/// more is closed at once: the client sees the connection refused, UNAVAILABLE),
/// each given `header_timeout` to send its first bytes (the HTTP/2 preface); accept
/// errors waited out.
#[cfg(feature = "grpc")]
pub(super) fn grpc_incoming(
    listener: TcpListener,
    limits: Limits,
) -> impl futures::Stream<Item = std::io::Result<Counted>> + Send + 'static {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    futures::stream::unfold((listener, open), move |(listener, open)| async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "flumen serve: cannot accept a gRPC connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
                continue; // dropped: closed at once
            };
            let _ = tcp.set_nodelay(true);
            let counted = Counted {
                io: tcp,
                _permit: permit,
                first_byte: Some(Box::pin(tokio::time::sleep(limits.header_timeout))),
            };
            return Some((Ok(counted), (listener, open)));
        }
    })
}

/// A gRPC connection holding its place under the cap until it closes; until its
/// first bytes arrive, a read past the deadline fails.
#[cfg(feature = "grpc")]
pub(super) struct Counted {
    io: TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    first_byte: Option<Pin<Box<tokio::time::Sleep>>>,
}

#[cfg(feature = "grpc")]
impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(feature = "grpc")]
impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        let Some(deadline) = self.first_byte.as_mut() else {
            return poll;
        };
        match poll {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.first_byte = None;
                poll
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within the header timeout",
                )))
            }
            _ => poll,
        }
    }
}

#[cfg(feature = "grpc")]
impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
