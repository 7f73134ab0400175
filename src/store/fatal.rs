//! The store's one-way failure switch. A failed fsync, or a failed write
//! inside sled (which poisons itself after one), cannot be retried safely:
//! from then on nothing is acknowledged, and the app stops the process
//! (non-zero) so that its supervisor restarts it and recovery runs.

use std::sync::Arc;

use tokio::sync::watch;

#[derive(Clone)]
pub struct Fatal(Arc<watch::Sender<Option<String>>>);

impl Default for Fatal {
    fn default() -> Self {
        Fatal(Arc::new(watch::channel(None).0))
    }
}

impl Fatal {
    /// Records the first failure and logs it; later ones only log.
    pub fn fail(&self, why: String) {
        log::error!("store failure, nothing more is acknowledged: {why}");
        self.0.send_if_modified(|slot| {
            if slot.is_none() {
                *slot = Some(why);
                true
            } else {
                false
            }
        });
    }

    /// Why the store failed, if it has.
    pub fn failed(&self) -> Option<String> {
        self.0.borrow().clone()
    }

    /// Resolves once the store has failed, with the reason.
    pub async fn wait(&self) -> String {
        let mut rx = self.0.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            // The sender lives as long as the store: never reached while
            // anyone can wait.
            Err(_) => std::future::pending().await,
        }
    }
}
