//! Wake-ups across nodes (SPEC §12), with PostgreSQL's `LISTEN/NOTIFY`:
//! a node that queues a request tells every dispatcher of its lane
//! (`asyncgate_queued`), and one that finishes or removes a request tells
//! every long-poll waiting for it (`asyncgate_finished`).
//!
//! Notes go after the commit, batched by a task of their own (many per
//! `pg_notify` payload), so no transaction waits for them. They are a
//! hurry, not the truth: one lost (a node dying between its commit and its
//! note, a listening connection that broke) costs latency only, since each
//! dispatcher rescans the queued lanes every two seconds and each node
//! looks at the requests its long-polls watch as often.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use super::row;
use crate::model::{LaneKey, RequestId};
use crate::store::waiters::Waiters;

const QUEUED: &str = "asyncgate_queued";
const FINISHED: &str = "asyncgate_finished";
/// Under PostgreSQL's 8000-byte payload limit.
const PAYLOAD: usize = 7_800;
/// How long notes gather before they go: a wake-up across nodes waits this
/// much more, and a busy node sends a hundred a second at most.
const GATHER: Duration = Duration::from_millis(10);
/// How often a node looks at the requests its long-polls wait for, in
/// case a note was lost.
pub const SAFETY_NET: Duration = Duration::from_secs(2);

pub enum Note {
    Queued(LaneKey),
    Finished(RequestId),
}

/// Where this node's notes go (to its sending task).
#[derive(Clone)]
pub struct Notes(mpsc::UnboundedSender<Note>);

impl Notes {
    pub fn send(&self, note: Note) {
        let _ = self.0.send(note);
    }

    pub fn send_all(&self, notes: impl IntoIterator<Item = Note>) {
        for n in notes {
            self.send(n);
        }
    }
}

/// Where heard notes of queued lanes go: the dispatcher, once it listens.
pub type Inbox = Arc<Mutex<Option<mpsc::UnboundedSender<LaneKey>>>>;

/// Hands lanes to this node's dispatcher (if it listens yet).
pub fn deliver(inbox: &Inbox, lanes: impl IntoIterator<Item = LaneKey>) {
    let to = inbox.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(to) = to.as_ref() {
        for lane in lanes {
            let _ = to.send(lane);
        }
    }
}

pub fn channel() -> (Notes, mpsc::UnboundedReceiver<Note>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Notes(tx), rx)
}

/// Sends what this node noted, as few `pg_notify` calls as it takes: at
/// most one a `GATHER` (each is a commit, and every node reads each).
pub async fn send(pool: Pool, life: i64, mut rx: mpsc::UnboundedReceiver<Note>) {
    while let Some(first) = rx.recv().await {
        tokio::time::sleep(GATHER).await;
        let mut lanes: HashSet<LaneKey> = HashSet::new();
        let mut ids: HashSet<RequestId> = HashSet::new();
        let mut next = Some(first);
        while let Some(note) = next {
            match note {
                Note::Queued(l) => lanes.insert(l),
                Note::Finished(id) => ids.insert(id),
            };
            next = rx.try_recv().ok();
        }
        let mut channels = Vec::new();
        let mut payloads = Vec::new();
        // Queued lanes name the life that queued them: its own dispatcher
        // knows them already (its HTTP handlers tell it; what a takeover
        // requeued, it finds on its next rescan). A flood of credentials
        // would otherwise come back to it as a second flood of lanes.
        for p in pack(lanes.iter().map(hex)) {
            channels.push(QUEUED);
            payloads.push(format!("{life};{p}"));
        }
        for p in pack(ids.iter().map(RequestId::to_string)) {
            channels.push(FINISHED);
            payloads.push(p);
        }
        let sent = async {
            let c = pool.get().await.map_err(|e| e.to_string())?;
            c.execute(
                "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p)",
                &[&channels, &payloads],
            )
            .await
            .map_err(|e| super::describe(&e))
        };
        if let Err(e) = sent.await {
            log::warn!("telling the other nodes failed ({e}); they find it on their next look");
        }
    }
}

/// Items joined by commas into payloads under the limit.
fn pack(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for item in items {
        if !cur.is_empty() && cur.len() + 1 + item.len() > PAYLOAD {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(',');
        }
        cur.push_str(&item);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn hex(lane: &LaneKey) -> String {
    lane.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<LaneKey> {
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()?;
    LaneKey::try_from(bytes.as_slice()).ok()
}

/// Listens on a connection of its own, reconnecting with backoff; while
/// it cannot, the rescans and the safety net keep things going.
pub async fn listen(
    config: tokio_postgres::Config,
    life: i64,
    waiters: Arc<Waiters>,
    inbox: Inbox,
) {
    let mut pause = Duration::from_millis(100);
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages = futures_util::stream::poll_fn(|cx| conn.poll_message(cx));
                    while let Some(Ok(m)) = messages.next().await {
                        if let AsyncMessage::Notification(n) = m {
                            let _ = tx.send(n);
                        }
                    }
                });
                let listening = client
                    .batch_execute(&format!("LISTEN {QUEUED}; LISTEN {FINISHED}"))
                    .await;
                if listening.is_ok() {
                    pause = Duration::from_millis(100);
                    while let Some(n) = rx.recv().await {
                        heard(life, n.channel(), n.payload(), &waiters, &inbox);
                    }
                }
                driver.abort();
                log::warn!("listening for the other nodes' notes stopped; listening again");
            }
            Err(e) => log::warn!(
                "cannot listen for the other nodes' notes ({}); trying again",
                super::describe(&e)
            ),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

fn heard(life: i64, channel: &str, payload: &str, waiters: &Waiters, inbox: &Inbox) {
    match channel {
        QUEUED => {
            let Some((from, lanes)) = payload.split_once(';') else {
                return;
            };
            if from.parse() == Ok(life) {
                return;
            }
            let items = lanes.split(',').filter(|s| !s.is_empty());
            deliver(inbox, items.filter_map(unhex));
        }
        FINISHED => {
            let items = payload.split(',').filter(|s| !s.is_empty());
            waiters.wake(items.filter_map(|s| s.parse::<RequestId>().ok()))
        }
        _ => {}
    }
}

/// Wakes, every `SAFETY_NET`, the long-polls of requests that finished
/// or went without a note reaching this node.
pub async fn safety_net(pool: Pool, waiters: Arc<Waiters>) {
    loop {
        tokio::time::sleep(SAFETY_NET).await;
        let watched = waiters.watched();
        if watched.is_empty() {
            continue;
        }
        let keys: Vec<Vec<u8>> = watched.iter().map(|id| id.0.to_vec()).collect();
        let open = async {
            let c = pool.get().await.ok()?;
            let rows = c
                .query(
                    "SELECT id FROM requests WHERE id = ANY($1) AND status IN (0, 1)",
                    &[&keys],
                )
                .await
                .ok()?;
            rows.iter()
                .map(|r| row::id(r.get(0)).ok())
                .collect::<Option<HashSet<RequestId>>>()
        };
        if let Some(open) = open.await {
            waiters.wake(watched.into_iter().filter(|id| !open.contains(id)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_the_limit_and_lanes_read_back() {
        let lanes: Vec<LaneKey> = (0..300u16).map(|i| [(i % 251) as u8; 32]).collect();
        let packed = pack(lanes.iter().map(hex));
        assert!(packed.len() > 1);
        assert!(packed.iter().all(|p| p.len() <= PAYLOAD));
        let back: Vec<LaneKey> = packed
            .iter()
            .flat_map(|p| p.split(',').map(|s| unhex(s).expect("a lane")))
            .collect();
        assert_eq!(back, lanes);
        assert_eq!(unhex("zz"), None);
    }
}
