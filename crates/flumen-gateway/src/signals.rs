//! SIGINT and SIGTERM (what Ctrl-C, `kill`, systemd and Kubernetes send), for
//! `flumen run` and `flumen serve`.

/// SIGINT and SIGTERM, listened to from one place: a signal that arrives while
/// nobody awaits it (say, between the first and the wait for a second) is still
/// seen by the next [`Signals::recv`].
pub struct Signals {
    #[cfg(unix)]
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Starts listening now (inside a tokio runtime).
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signals = signal(SignalKind::interrupt())
                .and_then(|int| Ok((int, signal(SignalKind::terminate())?)))
                .ok();
            Signals { signals }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// The next SIGINT or SIGTERM (Ctrl-C where the two cannot be listened to).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some((int, term)) = &mut self.signals {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
