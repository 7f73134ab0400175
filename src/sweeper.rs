//! Retention: deletes requests whose retention has ended, oldest first: a
//! time-ordered run of the expiry index at a time, each run one journal
//! entry and one store round, so expiring a minute of requests costs about
//! what accepting them did. Reads answer 404 past retention on their own
//! (`RequestRecord::is_expired`); the sweep only reclaims space, and the
//! journal segments go whole once nothing in them is referenced. Its own
//! thread, with a small runtime of its own to wait on the store: a long
//! run of deletes never holds up an HTTP worker.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::model::now_ms;
use crate::store::Store;

/// Requests deleted per round, and the pause after a full one: a round
/// of deletes shares the writer with submissions, so runs stay short
/// (measured in benches/RESULTS.md: accept p99 during a sweep).
const BATCH: usize = 128;
const PAUSE: Duration = Duration::from_millis(1);
/// The longest sleep: new expiries are noticed within it (one cheap
/// look at the expiry index a second).
const MAX_IDLE: Duration = Duration::from_secs(1);

pub struct Sweeper {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Sweeper {
    pub fn start(store: Arc<Store>) -> Sweeper {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("asyncgate-sweeper".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        store
                            .fatal()
                            .fail(format!("starting the retention sweep: {e}"));
                        return;
                    }
                };
                loop {
                    let wait = match rt.block_on(store.expire(now_ms(), BATCH)) {
                        Ok(n) if n == BATCH => PAUSE,
                        Ok(_) => rt.block_on(until_next(&store)),
                        Err(e) => {
                            log::error!("retention sweep: {e}");
                            Duration::from_secs(5)
                        }
                    };
                    match stopped.recv_timeout(wait) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
                log::info!("retention sweep stopped");
            })
            .expect("spawning the sweeper thread");
        Sweeper { stop, thread }
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

async fn until_next(store: &Store) -> Duration {
    match store.next_expiry().await {
        Ok(Some(at)) => Duration::from_millis(at.saturating_sub(now_ms()).max(10)).min(MAX_IDLE),
        _ => MAX_IDLE,
    }
}
