//! The store's one writer: a thread that takes every change queued by the
//! HTTP handlers, the dispatcher, the callbacks and the sweeper, and in
//! rounds (group commit) appends them to the journal, fsyncs it once, then
//! applies them to sled in one transaction and answers each. A change is
//! answered only once it is durable; sled itself is flushed by the
//! checkpointer (`checkpoint`), off the hot path.
//!
//! A failed fsync or journal write is final (the lesson of PostgreSQL's
//! "fsyncgate"): every change waiting or to come gets an error, and the
//! store's `fatal` signal tells the app to exit. The one exception is a
//! submission whose entry finds the disk full: refused alone (507).

use std::sync::{Condvar, Mutex};

use sled::Transactional;
use sled::transaction::TransactionError;
use tokio::sync::oneshot;

use super::change::{Applied, Change, IDEMPOTENCY, META, Tx};
use super::journal::{self, Position};
use super::{StoreError, codec, keys};
use crate::model::{BodyRef, LaneKey, RequestId};

/// Operations per round, at most (more wait for the next).
const MAX_ROUND: usize = 1024;
/// Bytes of bodies and responses per round, at most (but one operation).
const MAX_ROUND_BYTES: usize = 64 << 20;

type Reply = oneshot::Sender<Result<Vec<Applied>, StoreError>>;

/// A change with its blobs (bodies, a response), as queued.
pub(super) type WithBlobs = (Change, Vec<Vec<u8>>);

impl Op {
    /// The bytes of bodies and responses it carries.
    fn size(&self) -> usize {
        match self {
            Op::Changes(c) => c.iter().flat_map(|(_, b)| b).map(Vec::len).sum(),
            Op::Submit(_, body) => body.len(),
            Op::Claim { .. } => 0,
        }
    }
}

/// An operation queued for the writer.
pub(super) enum Op {
    /// Changes written as given, with their blobs.
    Changes(Vec<WithBlobs>),
    /// Claims of the heads of these lanes (one per mention), resolved by
    /// the writer against the state it is about to change.
    Claim { lanes: Vec<LaneKey>, now_ms: u64 },
    /// A new request; its sequence number is given by the writer.
    Submit(Box<Change>, Vec<u8>),
}

#[derive(Default)]
struct Queue {
    ops: Vec<(Op, Reply)>,
    stop: bool,
    /// The writer thread is gone (a panic): nothing will answer.
    dead: bool,
}

pub(super) struct Writer {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// Whether an I/O error means the disk is full (a submission is refused
/// alone) rather than broken.
fn out_of_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull
            | std::io::ErrorKind::QuotaExceeded
            | std::io::ErrorKind::FileTooLarge
    )
}

impl Writer {
    pub(super) fn new() -> Writer {
        Writer {
            queue: Mutex::default(),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `op`; the receiver answers once it is durable (or refused).
    pub(super) fn send(&self, op: Op) -> oneshot::Receiver<Result<Vec<Applied>, StoreError>> {
        let (reply, answer) = oneshot::channel();
        let mut q = self.lock();
        if q.stop {
            let _ = reply.send(Err(StoreError::Closed));
        } else if q.dead {
            let _ = reply.send(Err(StoreError::Unavailable(
                "the store's writer stopped".into(),
            )));
        } else {
            q.ops.push((op, reply));
            self.wake.notify_one();
        }
        answer
    }

    /// Lets the thread finish what is queued, then end.
    pub(super) fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_one();
    }

    /// The next round's operations; `None` once stopped and drained.
    fn take(&self) -> Option<Vec<(Op, Reply)>> {
        let mut q = self.lock();
        while q.ops.is_empty() && !q.stop {
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.ops.is_empty() {
            return None;
        }
        // At most MAX_ROUND operations and, past the first, MAX_ROUND_BYTES
        // of bodies: a round's bytes are held in memory until written.
        let mut bytes = 0;
        let n = q
            .ops
            .iter()
            .take(MAX_ROUND)
            .take_while(|(op, _)| {
                let first = bytes == 0;
                bytes += op.size();
                first || bytes <= MAX_ROUND_BYTES
            })
            .count()
            .max(1);
        Some(q.ops.drain(..n).collect())
    }

    /// The writer's two stages, pipelined: this thread frames, writes and
    /// fsyncs round after round; an applier thread applies each synced
    /// round to sled and answers it, while the next round's fsync runs.
    /// Claims are resolved against the trees as the applier has left them,
    /// which may be a round behind: a head taken meanwhile is `Skipped`,
    /// one added meanwhile found on the dispatcher's next turn (it awaits
    /// its claims before handling the events that announced them).
    ///
    /// A panic in either stage stops the store (fatal: the app exits and a
    /// restart recovers) and answers everything queued, rather than leave
    /// writers waiting on a thread that is gone.
    pub(super) fn run(&self, store: &super::Core) {
        let (to_apply, applying) = std::sync::mpsc::sync_channel::<Written>(2);
        std::thread::scope(|scope| {
            let applier = std::thread::Builder::new()
                .name("asyncgate-apply".into())
                .spawn_scoped(scope, move || {
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        for written in applying.iter() {
                            store.apply_written(written);
                        }
                    }));
                    if ran.is_err() {
                        store.fatal.fail("the store's applier panicked".into());
                    }
                });
            if let Err(e) = applier {
                store
                    .fatal
                    .fail(format!("starting the store's applier failed: {e}"));
            }
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                while let Some(ops) = self.take() {
                    if let Some(why) = store.fatal.failed() {
                        for (_, reply) in ops {
                            let _ = reply.send(Err(StoreError::Unavailable(why.clone())));
                        }
                        continue;
                    }
                    if let Some(written) = store.journal_round(ops)
                        && let Err(lost) = to_apply.send(written)
                    {
                        store.fail_round(
                            lost.0.placed.into_iter().map(|(f, _)| f.reply),
                            "the store's applier stopped".into(),
                        );
                    }
                }
            }));
            drop(to_apply);
            if ran.is_err() {
                store.fatal.fail("the store's writer panicked".into());
                let mut q = self.lock();
                q.dead = true;
                for (_, reply) in q.ops.drain(..) {
                    let _ = reply.send(Err(StoreError::Unavailable(
                        "the store's writer panicked".into(),
                    )));
                }
            }
        });
    }
}

/// A round on disk, waiting to be applied, with the journal position just
/// past it (the checkpoint its transaction records).
struct Written {
    placed: Vec<(Framed, Position)>,
    end: Position,
}

/// One operation's entries, framed, before they are written.
struct Framed {
    reply: Reply,
    entries: Entries,
}

struct Entries {
    /// Each change with its blobs' lengths and the length of its encoded
    /// meta part (where its blobs begin).
    changes: Vec<(Change, Vec<u64>, u64)>,
    bytes: Vec<u8>,
    /// Offsets of each entry within `bytes`.
    starts: Vec<u64>,
    /// Submissions and claims: refused (not fatal) when the disk is full,
    /// nothing having happened yet that must be recorded.
    refusable: bool,
}

impl super::Core {
    /// The journal half of a group-commit round: frame, write, fsync.
    /// `None` when nothing is left to apply (all refused, or failed).
    fn journal_round(&self, ops: Vec<(Op, Reply)>) -> Option<Written> {
        // A full disk can refuse the new segment: the current one then
        // grows past its size, and what does not fit is refused below.
        if let Err(e) = self.journal.roll_if_full() {
            if !out_of_space(&e) {
                self.fail_round(
                    ops.into_iter().map(|(_, r)| r),
                    format!("starting a journal segment failed: {e}"),
                );
                return None;
            }
            log::warn!("no space for a new journal segment; writing on in the current one");
        }
        let mut framed = Vec::with_capacity(ops.len());
        let mut claimed: std::collections::HashMap<LaneKey, usize> = Default::default();
        for (op, reply) in ops {
            match self.frame(op, &mut claimed) {
                Ok(entries) => framed.push(Framed { reply, entries }),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        let placed = self.write_all(framed)?;
        // (A round of empty claims alone wrote nothing to sync.)
        let written = placed.iter().any(|(f, _)| !f.entries.bytes.is_empty());
        let synced = if written { self.journal.sync() } else { Ok(()) };
        if let Err(e) = synced {
            self.fail_round(
                placed.into_iter().map(|(f, _)| f.reply),
                format!("fsync of the journal failed: {e}"),
            );
            return None;
        }
        let end = self.journal.end();
        Some(Written { placed, end })
    }

    /// The sled half: apply a synced round in one transaction, answer it,
    /// wake the waiters of what it finished.
    fn apply_written(&self, written: Written) {
        let Written { placed, end } = written;
        if let Some(why) = self.fatal.failed() {
            for (f, _) in placed {
                let _ = f.reply.send(Err(StoreError::Unavailable(why.clone())));
            }
            return;
        }
        match self.apply_round(&placed, end) {
            Ok(results) => {
                let finished: Vec<RequestId> = placed
                    .iter()
                    .flat_map(|(f, _)| f.entries.changes.iter())
                    .flat_map(|(c, _, _)| finishing(c))
                    .collect();
                for ((f, _), r) in placed.into_iter().zip(results) {
                    let _ = f.reply.send(Ok(r));
                }
                // After the replies: reading the records for the waiters
                // does not hold back the round's 202s.
                self.waiters.wake_with(finished, |id| self.record(id));
            }
            Err(e) => {
                let why = format!("applying a journal round to sled failed: {e}");
                self.fail_round(placed.into_iter().map(|(f, _)| f.reply), why);
            }
        }
    }

    fn fail_round(&self, replies: impl Iterator<Item = Reply>, why: String) {
        log::error!("{why}");
        self.fatal.fail(why);
        for r in replies {
            let _ = r.send(Err(StoreError::NotDurable));
        }
    }

    /// Turns an operation into framed journal entries.
    fn frame(
        &self,
        op: Op,
        claimed: &mut std::collections::HashMap<LaneKey, usize>,
    ) -> Result<Entries, StoreError> {
        let changes: Vec<WithBlobs> = match op {
            Op::Changes(c) => c,
            Op::Submit(change, body) => {
                let mut change = *change;
                if let Change::Submit { rec, .. } = &mut change {
                    rec.seq = self.db.generate_id()?;
                }
                let blobs = if body.is_empty() { vec![] } else { vec![body] };
                vec![(change, blobs)]
            }
            Op::Claim { lanes, now_ms } => self.resolve_claims(&lanes, now_ms, claimed)?,
        };
        let mut bytes = Vec::new();
        let mut starts = Vec::with_capacity(changes.len());
        let mut out = Vec::with_capacity(changes.len());
        let mut refusable = true;
        for (change, blobs) in changes {
            refusable &= matches!(change, Change::Submit { .. } | Change::Claim { .. });
            let lens: Vec<u64> = blobs.iter().map(|b| b.len() as u64).collect();
            if is_empty_claim(&change) {
                starts.push(bytes.len() as u64);
                out.push((change, lens, 0));
                continue;
            }
            let meta = codec::encode(&(&change, &lens))?;
            let mut payload =
                Vec::with_capacity(4 + meta.len() + lens.iter().sum::<u64>() as usize);
            payload.extend_from_slice(&(meta.len() as u32).to_le_bytes());
            payload.extend_from_slice(&meta);
            for b in &blobs {
                payload.extend_from_slice(b);
            }
            starts.push(bytes.len() as u64);
            journal::frame(&mut bytes, &payload);
            out.push((change, lens, meta.len() as u64));
        }
        Ok(Entries {
            changes: out,
            bytes,
            starts,
            refusable,
        })
    }

    /// The lane entries a claim of `lanes` will take, read from the trees
    /// as the previous round left them; heads already taken by this round
    /// are skipped.
    fn resolve_claims(
        &self,
        lanes: &[LaneKey],
        now_ms: u64,
        claimed: &mut std::collections::HashMap<LaneKey, usize>,
    ) -> Result<Vec<WithBlobs>, StoreError> {
        // Each lane's heads read once: a lane named k times takes its
        // first k entries not yet taken by this round.
        let mut heads: std::collections::HashMap<LaneKey, std::vec::IntoIter<Change>> =
            Default::default();
        for lane in lanes {
            if heads.contains_key(lane) {
                continue;
            }
            let wanted = lanes.iter().filter(|l| *l == lane).count();
            let taken = claimed.entry(*lane).or_default();
            let mut found = Vec::with_capacity(wanted);
            for item in self
                .tree(super::change::LANES)
                .scan_prefix(lane)
                .skip(*taken)
                .take(wanted)
            {
                let (k, v) = item?;
                let (Some(seq), Some(id)) = (k.get(32..), keys::id_from(&v)) else {
                    continue;
                };
                found.push(Change::Claim {
                    lane: *lane,
                    seq: codec::u64_be(seq),
                    id,
                    now_ms,
                });
            }
            *taken += wanted;
            heads.insert(*lane, found.into_iter());
        }
        Ok(lanes
            .iter()
            .map(|lane| {
                // No head: an empty claim, answered without a journal entry.
                let change = heads.get_mut(lane).and_then(Iterator::next);
                let change = change.unwrap_or(Change::Claim {
                    lane: *lane,
                    seq: u64::MAX,
                    id: crate::model::RequestId([0; 16]),
                    now_ms,
                });
                (change, vec![])
            })
            .collect())
    }

    /// Writes the round's entries in one go. `None` when the journal
    /// failed (the store is then fatal).
    fn write_all(&self, framed: Vec<Framed>) -> Option<Vec<(Framed, Position)>> {
        match self.journal.write_parts(&parts(&framed)) {
            Ok(at) => Some(place(framed, at)),
            Err(e) if out_of_space(&e) => {
                // A full disk: submissions and claims are refused (507, or
                // a retry later); what must be recorded (an upstream's
                // answer, a delete) gets one more try on its own.
                let (refused, kept): (Vec<Framed>, Vec<Framed>) =
                    framed.into_iter().partition(|f| f.entries.refusable);
                for f in refused {
                    let _ = f.reply.send(Err(StoreError::NoSpace));
                }
                if kept.is_empty() {
                    return Some(Vec::new());
                }
                match self.journal.write_parts(&parts(&kept)) {
                    Ok(at) => Some(place(kept, at)),
                    Err(e) => {
                        let why = format!("writing the journal failed: {e}");
                        self.fail_round(kept.into_iter().map(|f| f.reply), why);
                        None
                    }
                }
            }
            Err(e) => {
                let why = format!("writing the journal failed: {e}");
                self.fail_round(framed.into_iter().map(|f| f.reply), why);
                None
            }
        }
    }

    /// Applies a written round in one sled transaction, with the journal
    /// position it brings the trees to.
    fn apply_round(
        &self,
        placed: &[(Framed, Position)],
        end: Position,
    ) -> Result<Vec<Vec<Applied>>, StoreError> {
        let located: Vec<Vec<(&Change, Vec<BodyRef>)>> = placed
            .iter()
            .map(|(f, at)| {
                f.entries
                    .changes
                    .iter()
                    .zip(&f.entries.starts)
                    .map(|((change, lens, meta_len), start)| {
                        let entry = Position {
                            segment: at.segment,
                            offset: at.offset + start,
                        };
                        (change, blob_refs(entry, *meta_len, lens))
                    })
                    .collect()
            })
            .collect();
        let checkpoint = codec::encode(&end)?;
        self.transact(|tx| {
            let mut out = Vec::with_capacity(located.len());
            for op in &located {
                let mut results = Vec::with_capacity(op.len());
                for (change, blobs) in op {
                    results.push(if is_empty_claim(change) {
                        Applied::Claimed(super::Claim::Empty)
                    } else {
                        tx.apply(change, blobs)?
                    });
                }
                out.push(results);
            }
            tx.finish()?;
            tx.t(META).insert("checkpoint", checkpoint.as_slice())?;
            Ok(out)
        })
    }

    /// Runs `f` as one transaction over all trees. A storage error inside
    /// sled (a failed write poisons it) is fatal.
    pub(super) fn transact<T>(
        &self,
        f: impl Fn(&Tx) -> super::change::TxResult<T>,
    ) -> Result<T, StoreError> {
        // Held across the transaction and the index changes it made: the
        // checkpointer takes the trees' checkpoint and the index's changes
        // under this lock, so they are of the same round.
        let mut index = self.keyed.lock();
        // Every tree but the emptied index of older formats.
        let (out, keyed) = self.trees[..IDEMPOTENCY]
            .transaction(|trees| {
                let tx = Tx::new(trees, &index, self.keyed.disk());
                let out = f(&tx)?;
                Ok((out, tx.keyed()))
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => {
                    self.fatal.fail(format!("a write inside sled failed: {e}"));
                    StoreError::Sled(e)
                }
            })?;
        for (key, to) in keyed {
            index.set(key, to);
        }
        Ok(out)
    }
}

fn parts(framed: &[Framed]) -> Vec<&[u8]> {
    framed.iter().map(|f| f.entries.bytes.as_slice()).collect()
}

/// Each operation's position, its entries written one after another at `at`.
fn place(framed: Vec<Framed>, at: Position) -> Vec<(Framed, Position)> {
    let mut offset = at.offset;
    framed
        .into_iter()
        .map(|f| {
            let pos = Position {
                segment: at.segment,
                offset,
            };
            offset += f.entries.bytes.len() as u64;
            (f, pos)
        })
        .collect()
}

/// The requests a change may finish or remove: their waiters look again.
fn finishing(change: &Change) -> Vec<RequestId> {
    match change {
        Change::Complete { id, .. }
        | Change::Unknown { id, .. }
        | Change::Delete { id }
        | Change::Cancel { id } => vec![*id],
        Change::Expire { due, .. } => due.iter().map(|(_, id)| *id).collect(),
        _ => Vec::new(),
    }
}

/// A claim of a lane found empty: in the journal for nothing.
pub(super) fn is_empty_claim(change: &Change) -> bool {
    matches!(change, Change::Claim { seq: u64::MAX, .. })
}

/// Where the blobs of the entry framed at `entry` are, after its meta part
/// of `meta_len` bytes.
pub(super) fn blob_refs(entry: Position, meta_len: u64, lens: &[u64]) -> Vec<BodyRef> {
    let payload = journal::payload_at(entry);
    let mut offset = payload.offset + 4 + meta_len;
    lens.iter()
        .map(|&len| {
            let r = BodyRef {
                segment: entry.segment,
                offset,
                len,
            };
            offset += len;
            r
        })
        .collect()
}
