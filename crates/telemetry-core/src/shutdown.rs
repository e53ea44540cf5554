//! One shutdown signal for the whole process.
//!
//! Every long-lived task holds a clone and `select!`s on [`Shutdown::wait`]. SIGINT and SIGTERM
//! trigger it, and so does any stage that fails for good, so that the others stop too and the
//! process exits with the first error instead of limping on half alive.

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop. Idempotent.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown has been asked for.
    pub async fn wait(&self) {
        self.token.cancelled().await
    }

    /// A shutdown that the first SIGINT or SIGTERM triggers, as every binary's `run` needs.
    /// Must be called inside a tokio runtime.
    pub fn on_signals() -> Shutdown {
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();
        shutdown
    }

    /// Triggers shutdown on the first SIGINT or SIGTERM. Must be called inside a tokio runtime.
    pub fn trigger_on_signals(&self) {
        let shutdown = self.clone();
        tokio::spawn(async move {
            let signal = wait_for_signal().await;
            tracing::info!(signal, "shutdown requested; finishing work in flight");
            shutdown.trigger();
        });
    }
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        // Without signal handlers the process still stops on the default action, which is
        // what an operator would get anyway; waiting forever keeps that behaviour.
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_trigger() {
        let shutdown = Shutdown::new();
        let clone = shutdown.clone();
        let waiter = tokio::spawn(async move { clone.wait().await });
        assert!(!shutdown.is_triggered());
        shutdown.trigger();
        waiter.await.unwrap();
        assert!(shutdown.is_triggered());
    }
}
