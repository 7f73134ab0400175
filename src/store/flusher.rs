//! Group commit. One thread loops on `flush()` + `fsync`; writers take a
//! ticket after their write and wait until a flush that *began after it* has
//! finished. Many writers share one fsync, and sled never sees more than one
//! flush in flight (sled 0.34 deadlocks with eight or more `flush_async`).
//!
//! sled's `flush()` ends in `sync_file_range`, which survives a process
//! crash but not a power cut, so each round also `fsync`s the log file.
//!
//! A failed round is final (the lesson of PostgreSQL's "fsyncgate": after a
//! failed fsync the kernel may drop the dirty pages and report success the
//! next time). The flusher stops, every writer waiting now or later gets
//! `NotDurable`, and the store's `fatal` signal tells the app to exit.

use std::fs::File;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;

use super::StoreError;
use super::bodies::Bodies;
use super::fatal::Fatal;

/// A flush round a writer waits for.
#[derive(Clone, Copy, Debug)]
#[must_use = "a write is durable only once its ticket is waited for"]
pub struct Ticket(u64);

#[derive(Default)]
struct Rounds {
    /// Rounds begun so far; a ticket names the next one.
    began: u64,
    /// The highest round a writer waits for.
    wanted: u64,
    stop: bool,
}

/// The last finished round and whether it reached the disk.
#[derive(Clone, Copy)]
struct Finished {
    round: u64,
    ok: bool,
}

pub struct Flusher {
    rounds: Mutex<Rounds>,
    wake: Condvar,
    finished: watch::Sender<Finished>,
}

impl Flusher {
    /// Starts the flusher thread for `db`, whose log file is `log`.
    pub fn start(
        db: sled::Db,
        log: File,
        bodies: Arc<Bodies>,
        fatal: Fatal,
    ) -> (Arc<Flusher>, JoinHandle<()>) {
        let (finished, _) = watch::channel(Finished { round: 0, ok: true });
        let flusher = Arc::new(Flusher {
            rounds: Mutex::new(Rounds::default()),
            wake: Condvar::new(),
            finished,
        });
        let worker = Arc::clone(&flusher);
        let handle = std::thread::Builder::new()
            .name("asyncgate-flusher".into())
            .spawn(move || worker.run(&db, &log, &bodies, &fatal))
            .expect("spawning the flusher thread");
        (flusher, handle)
    }

    fn run(&self, db: &sled::Db, log: &File, bodies: &Bodies, fatal: &Fatal) {
        loop {
            let round = {
                let mut r = self.lock();
                while r.wanted <= r.began && !r.stop {
                    r = self.wake.wait(r).unwrap_or_else(|p| p.into_inner());
                }
                if r.wanted <= r.began {
                    return; // stopped, with nobody waiting
                }
                r.began += 1;
                r.began
            };
            // Bodies are made durable before the records naming them are
            // written (see `bodies`); this covers any other appends.
            let flushed = bodies
                .sync()
                .map_err(sled::Error::from)
                .and_then(|_| db.flush())
                .and_then(|_| Ok(log.sync_data()?));
            if let Err(e) = flushed {
                fatal.fail(format!("flushing the store to disk failed: {e}"));
                // Every round from this one on has failed, for good.
                self.finished.send_replace(Finished {
                    round: u64::MAX,
                    ok: false,
                });
                return;
            }
            self.finished.send_replace(Finished { round, ok: true });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Call after a write: names the first round that will cover it.
    pub fn ticket(&self) -> Ticket {
        let mut r = self.lock();
        let t = r.began + 1;
        if r.wanted < t {
            r.wanted = t;
            self.wake.notify_one();
        }
        Ticket(t)
    }

    /// Resolves once the ticket's write is on disk.
    pub async fn wait(&self, ticket: Ticket) -> Result<(), StoreError> {
        let mut rx = self.finished.subscribe();
        let done = rx
            .wait_for(|f| f.round >= ticket.0)
            .await
            .map_err(|_| StoreError::Closed)?;
        if done.ok {
            Ok(())
        } else {
            Err(StoreError::NotDurable)
        }
    }

    /// Blocking variant for start-up and shutdown, outside any runtime.
    pub fn wait_blocking(&self, ticket: Ticket) -> Result<(), StoreError> {
        let mut rx = self.finished.subscribe();
        loop {
            let f = *rx.borrow_and_update();
            if f.round >= ticket.0 {
                return if f.ok {
                    Ok(())
                } else {
                    Err(StoreError::NotDurable)
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Lets the thread finish the rounds already wanted, then end.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_one();
    }
}
