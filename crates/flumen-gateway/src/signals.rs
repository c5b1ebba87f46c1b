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
    pub async fn recv(&mut self) -> Signal {
        #[cfg(unix)]
        if let Some((int, term)) = &mut self.signals {
            return tokio::select! {
                _ = int.recv() => Signal::Interrupt,
                _ = term.recv() => Signal::Terminate,
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        Signal::Interrupt
    }
}

/// Which signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Signal {
    /// The exit status a shell reports for a process this signal ended: 128 + its
    /// number (130 for SIGINT, 143 for SIGTERM).
    pub fn exit_code(self) -> u8 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }
}
