//! The callback events' part of `change::Tx`: one scheduled when a request
//! finishes, then delivered, moved to its next try, or given up; the
//! record keeps the latest event's view.

use sled::transaction::ConflictableTransactionError as Conflict;

use super::change::{Applied, CALLBACKS, Change, Tx, TxResult};
use super::{CallbackEntry, codec, keys};
use crate::model::{CallbackState, RequestId, RequestRecord, Status};

impl Tx<'_> {
    /// A callback's progress (`CallbackDone`, `CallbackRetry`,
    /// `CallbackGaveUp`); any other change is not one.
    pub(super) fn apply_callback(&self, change: &Change) -> TxResult<Applied> {
        Ok(match change {
            Change::CallbackDone { due_ms, id, code } => {
                let Some(entry) = self.take_callback(*due_ms, id)? else {
                    return Ok(Applied::Changed(false));
                };
                self.callback_progress(id, entry, |st| st.finished(*code))?;
                Applied::Changed(true)
            }
            Change::CallbackRetry {
                due_ms,
                id,
                next_ms,
                code,
            } => {
                let Some(mut entry) = self.take_callback(*due_ms, id)? else {
                    return Ok(Applied::Changed(false));
                };
                entry.attempts += 1;
                let v = codec::encode(&entry).map_err(Conflict::Abort)?;
                self.t(CALLBACKS)
                    .insert(&keys::timed(*next_ms, id)[..], v)?;
                self.callback_progress(id, entry, |st| {
                    st.retrying(entry.attempts, *code, *next_ms)
                })?;
                Applied::Changed(true)
            }
            Change::CallbackGaveUp { due_ms, id, last } => {
                let Some(entry) = self.take_callback(*due_ms, id)? else {
                    return Ok(Applied::Changed(false));
                };
                self.callback_progress(id, entry, |st| st.gave_up(entry.attempts, *last))?;
                Applied::Changed(true)
            }
            _ => Applied::Changed(false),
        })
    }

    /// A new callback event for `rec` (if it has a callback URL), due now.
    pub(super) fn call_back(
        &self,
        rec: &mut RequestRecord,
        status: Status,
        now_ms: u64,
    ) -> TxResult<()> {
        if rec.callback.is_none() {
            return Ok(());
        }
        let event = rec.callback_state.map_or(0, |s| s.event) + 1;
        let entry = CallbackEntry {
            event,
            status,
            attempts: 0,
        };
        let v = codec::encode(&entry).map_err(Conflict::Abort)?;
        self.t(CALLBACKS)
            .insert(&keys::timed(now_ms, &rec.id)[..], v)?;
        rec.callback_state = Some(CallbackState::pending(event, status, now_ms));
        Ok(())
    }

    /// Takes a pending callback entry out.
    fn take_callback(&self, due_ms: u64, id: &RequestId) -> TxResult<Option<CallbackEntry>> {
        Ok(self
            .t(CALLBACKS)
            .remove(&keys::timed(due_ms, id)[..])?
            .map(|v| callback_entry(&v)))
    }

    /// Updates the record's view of its callback, if `entry` is its latest
    /// event (an older one still delivering leaves the view alone).
    fn callback_progress(
        &self,
        id: &RequestId,
        entry: CallbackEntry,
        f: impl FnOnce(&mut CallbackState),
    ) -> TxResult<()> {
        let Ok(Some(mut rec)) = self.record(id)? else {
            return Ok(());
        };
        match &mut rec.callback_state {
            Some(st) if st.event == entry.event => f(st),
            _ => return Ok(()),
        }
        self.put(&rec)
    }
}

/// A `callbacks` value.
pub(super) fn callback_entry(v: &[u8]) -> CallbackEntry {
    codec::decode(v).unwrap_or(CallbackEntry {
        event: 1,
        status: Status::Done,
        attempts: 0,
    })
}
