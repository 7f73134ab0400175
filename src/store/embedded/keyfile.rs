//! The idempotency index on disk (`idempotency.idx` in the data dir): an
//! open-addressing hash table of `Key` → request id, read with `pread`
//! and written with `pwrite` by the checkpointer alone (`keyed`).
//!
//! sled was the index before: a new key cost a random leaf read on the
//! applier and a random insert on the checkpointer, both under sled's
//! lock that the applier's transactions take (benches/RESULTS.md). Here a
//! lookup reads the key's first two slots with one `pread` (a 512-byte
//! block at a time after that), never waits for sled, and takes only a
//! read lock that the checkpointer takes for writing to swap in a rebuilt
//! table.
//!
//! Layout: a 4 KiB header (magic, number of slots, the mark: the trees'
//! checkpoint the table reflects, a checksum), then `slots` slots of 32
//! bytes: the key, then the id. An all-zero key is an empty slot, an
//! all-zero id a removed key (its slot stays taken, so probes go past it,
//! and a later set of the same key takes it again). Linear probing, at
//! most half full (removed keys count): a write that would pass that
//! rebuilds the table first at four times its live keys, removed ones
//! left out, into `idempotency.new`, then renamed over it (`build`); so
//! the table follows the keys in retention, up and down. Without the disk
//! space for a rebuild it fills on, and past 3/4 new keys are refused
//! (507, `crowded`) until there is.
//!
//! Crashes: the checkpointer writes a round's changes only once sled's
//! trees are durably past that round, so the table is never ahead of the
//! trees; then it `fdatasync`s, then writes the header's mark. Slots
//! written after the last mark may or may not have survived a crash;
//! `open` makes the journal's changes from the mark again, which leaves
//! every key as the journal does: a set finds the key's first slot or the
//! first empty one, a removal tombstones the first (or the first empty
//! one). A key set again after a crash may also sit further along its
//! probe sequence (a slot before it that the crash emptied); the first
//! one is the journal's: lookups stop there, and a rebuild keeps only
//! that.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use super::StoreError;
use super::journal::Position;
use crate::model::RequestId;

/// `keys::idempotency`: 16 bytes of a hash of lane and key.
pub(super) type Key = [u8; 16];

const NAME: &str = "idempotency.idx";
const NEW: &str = "idempotency.new";
const MAGIC: &[u8; 8] = b"agkeys01";
const HEADER: u64 = 4096;
const SLOT: usize = 32;
/// Read at once after a key's first two slots: a sector.
const BLOCK: usize = 512;
const PER_BLOCK: u64 = (BLOCK / SLOT) as u64;
/// Read first: a probe of a table at most half full rarely goes further.
const FIRST: u64 = 2;
/// The smallest table: 512 KiB of slots.
const MIN_SLOTS: u64 = 1 << 14;
/// A table is built in memory (a key costs no syscall) this many bytes of
/// slots at a time; a larger one takes a read of its source a window.
const IN_MEMORY: u64 = 32 << 20;
/// Left free beside a rebuilt table; short of it, the table fills up to
/// 3/4, then new keys are refused (`crowded`) until it can be rebuilt.
const REBUILD_SPARE: u64 = 64 << 20;
/// Slots read at once when the table is scanned.
const CHUNK: u64 = 1 << 15;
const EMPTY: [u8; 16] = [0; 16];

pub(super) struct KeyFile {
    dir: PathBuf,
    /// `IN_MEMORY`; tests make it small, to build in many windows.
    in_memory: u64,
    table: RwLock<Table>,
    /// Slots taken (live or removed keys), and the last mark written:
    /// the checkpointer's alone.
    state: Mutex<State>,
    /// Over 3/4 full, its rebuild waiting for disk space.
    crowded: AtomicBool,
    /// Bytes free beside the table (tests pretend a full disk).
    free: fn(&Path) -> Result<u64, StoreError>,
}

struct Table {
    file: File,
    slots: u64,
}

#[derive(Default)]
struct State {
    used: u64,
    mark: Position,
}

/// What a slot holds.
enum Slot {
    Empty,
    Taken(Key, Option<RequestId>),
}

impl KeyFile {
    pub(super) fn path(dir: &Path) -> PathBuf {
        dir.join(NAME)
    }

    /// The table in `dir`, with its mark; `None` if there is none yet, or
    /// its header is damaged (the caller makes it again).
    pub(super) fn open(dir: &Path) -> Result<Option<(KeyFile, Position)>, StoreError> {
        build::clean(dir);
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .open(Self::path(dir))
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some((slots, mark)) = read_header(&file)? else {
            log::warn!("the idempotency index's header is damaged: making the index again");
            return Ok(None);
        };
        let table = Table { file, slots };
        let used = table.count(|_| true)?;
        Ok(Some((KeyFile::with(dir, table, used, mark), mark)))
    }

    /// A new table in `dir` for `keys` keys, which `fill` gives, every time
    /// it is called (a key given twice keeps the later id), marked `mark`,
    /// made durable before it takes its name.
    pub(super) fn create(
        dir: &Path,
        keys: u64,
        mark: Position,
        mut fill: impl FnMut(
            &mut dyn FnMut(&Key, RequestId) -> Result<(), StoreError>,
        ) -> Result<(), StoreError>,
    ) -> Result<KeyFile, StoreError> {
        build::clean(dir);
        let (table, used) = Table::build(dir, keys, mark, IN_MEMORY, &mut fill)?;
        Ok(KeyFile::with(dir, table, used, mark))
    }

    /// Over `table`, `used` slots taken, marked `mark`. Crowded if over 3/4
    /// (the next checkpoint rebuilds it if the disk has room).
    fn with(dir: &Path, table: Table, used: u64, mark: Position) -> KeyFile {
        KeyFile {
            dir: dir.to_path_buf(),
            in_memory: IN_MEMORY,
            crowded: AtomicBool::new(crowded(used, table.slots)),
            table: RwLock::new(table),
            state: Mutex::new(State { used, mark }),
            free: super::free_space,
        }
    }

    /// Whether new keys are refused: the table is over 3/4 full and its
    /// rebuild waits for disk space.
    pub(super) fn crowded(&self) -> bool {
        self.crowded.load(Ordering::Relaxed)
    }

    /// The request `key` names, as the table says.
    pub(super) fn get(&self, key: &Key) -> Result<Option<RequestId>, StoreError> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        Ok(match table.find(key)?.1 {
            Slot::Taken(_, id) => id,
            Slot::Empty => None,
        })
    }

    /// Writes `changes` (`None`: the key is removed) and makes them
    /// durable; the mark stays. Grows the table first if they could fill
    /// it past half. Called without changes, it tries again a rebuild
    /// that waits for room (`crowded`: no new key comes until then).
    pub(super) fn write(&self, changes: &[(Key, Option<RequestId>)]) -> Result<(), StoreError> {
        if changes.is_empty() && !self.crowded() {
            return Ok(());
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Each change takes a slot at most.
        let more = changes.len() as u64;
        let slots = self.table.read().unwrap_or_else(|p| p.into_inner()).slots;
        let after = state.used + more;
        if after * 2 > slots {
            // At most: the new table beside the old one, and its keys
            // spilled once.
            let bytes = (size_for(after) + after) * SLOT as u64 + HEADER;
            let room = (self.free)(&self.dir)?;
            if room >= bytes.saturating_add(REBUILD_SPARE) {
                self.rebuild(&mut state, more)?;
            } else {
                log::warn!(
                    "the idempotency index is {after} of {slots} slots full: its rebuild waits \
                     for {bytes} bytes free (the file system has {room})"
                );
            }
        }
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        for (key, to) in changes {
            state.used += table.put(key, *to)?;
        }
        table.file.sync_data()?;
        // Past 3/4 (a rebuild waiting for room), new keys are refused
        // until it is rebuilt: the table keeps room for what is in memory.
        self.crowded
            .store(crowded(state.used, table.slots), Ordering::Relaxed);
        Ok(())
    }

    /// Records that the table reflects the trees' checkpoint `at`.
    pub(super) fn mark(&self, at: Position) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.mark == at {
            return Ok(());
        }
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        table.file.write_all_at(&header(table.slots, at), 0)?;
        table.file.sync_data()?;
        state.mark = at;
        Ok(())
    }

    /// Rebuilds the table at four times its live keys and `more`, with
    /// each live key's first slot only, and swaps it in.
    fn rebuild(&self, state: &mut State, more: u64) -> Result<(), StoreError> {
        let old = self.table.read().unwrap_or_else(|p| p.into_inner());
        let live = old.count(|id| id.is_some())?;
        let (new, used) = Table::build(
            &self.dir,
            live + more,
            state.mark,
            self.in_memory,
            &mut |put| old.each_live(put),
        )?;
        drop(old);
        log::info!("idempotency index rebuilt: {} slots", new.slots);
        state.used = used;
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }
}

impl Table {
    fn home(&self, key: &Key) -> u64 {
        home(key, self.slots)
    }

    /// The first slot from `key`'s home that holds it or is empty.
    fn find(&self, key: &Key) -> Result<(Option<u64>, Slot), StoreError> {
        let key = stored(key);
        let mut at = self.home(&key);
        let mut buf = [0u8; BLOCK];
        // The home slot and the next, then a block at a time.
        let mut n = FIRST.min(self.slots - at);
        for _ in 0..self.slots.div_ceil(PER_BLOCK) + 2 {
            let buf = &mut buf[..n as usize * SLOT];
            self.file.read_exact_at(buf, HEADER + at * SLOT as u64)?;
            for (i, raw) in buf.chunks_exact(SLOT).enumerate() {
                match parse(raw) {
                    Slot::Taken(k, _) if k != key => {}
                    slot => return Ok((Some(at + i as u64), slot)),
                }
            }
            at = (at + n) % self.slots;
            n = (PER_BLOCK - at % PER_BLOCK).min(self.slots - at);
        }
        Ok((None, Slot::Empty))
    }

    /// Sets or removes `key`; 1 if it took an empty slot.
    fn put(&self, key: &Key, to: Option<RequestId>) -> Result<u64, StoreError> {
        let (at, slot) = self.find(key)?;
        let Some(at) = at else {
            return Err(full());
        };
        // A removal that finds no slot of the key's still leaves one: an
        // older copy further along (a crash emptied a slot before it) must
        // not come back when that slot is taken again.
        let taken = match slot {
            Slot::Empty => 1,
            Slot::Taken(..) => 0,
        };
        let mut bytes = [0u8; SLOT];
        bytes[..16].copy_from_slice(&stored(key));
        if let Some(id) = to {
            bytes[16..].copy_from_slice(id.as_bytes());
        }
        self.file.write_all_at(&bytes, HEADER + at * SLOT as u64)?;
        Ok(taken)
    }

    /// The slots in chunks, in order: each with its first slot's number.
    fn chunks(
        &self,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut buf = vec![0u8; CHUNK as usize * SLOT];
        let mut first = 0;
        while first < self.slots {
            let n = CHUNK.min(self.slots - first);
            let buf = &mut buf[..n as usize * SLOT];
            self.file.read_exact_at(buf, HEADER + first * SLOT as u64)?;
            f(first, buf)?;
            first += n;
        }
        Ok(())
    }

    /// Every live key at its first slot (the one a lookup finds: a
    /// duplicate further along its probe sequence is older), in slot
    /// order.
    fn each_live(
        &self,
        f: &mut dyn FnMut(&Key, RequestId) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.chunks(|first, buf| {
            for (i, raw) in buf.chunks_exact(SLOT).enumerate() {
                let Slot::Taken(key, Some(id)) = parse(raw) else {
                    continue;
                };
                let (at, home) = (first + i as u64, self.home(&key));
                let is_first = if home >= first && home <= at {
                    // Its probe sequence so far is in this chunk: a lookup
                    // reaches this slot if no slot before it is empty or
                    // holds the key.
                    let before = &buf[(home - first) as usize * SLOT..i * SLOT];
                    !before
                        .chunks_exact(SLOT)
                        .any(|s| s[..16] == key || s[..16] == EMPTY)
                } else {
                    self.find(&key)?.0 == Some(at)
                };
                if is_first {
                    f(&key, id)?;
                }
            }
            Ok(())
        })
    }

    /// Taken slots whose id passes `which`.
    fn count(&self, which: impl Fn(Option<RequestId>) -> bool) -> Result<u64, StoreError> {
        let mut n = 0;
        self.chunks(|_, buf| {
            for raw in buf.chunks_exact(SLOT) {
                if let Slot::Taken(_, id) = parse(raw) {
                    n += u64::from(which(id));
                }
            }
            Ok(())
        })?;
        Ok(n)
    }
}

/// Over 3/4 of the slots taken: new keys wait for a rebuild.
fn crowded(used: u64, slots: u64) -> bool {
    used * 4 > slots * 3
}

/// Slots for a table of `keys` keys: four a key, a power of two.
fn size_for(keys: u64) -> u64 {
    keys.saturating_mul(4).next_power_of_two().max(MIN_SLOTS)
}

/// A key's first slot to probe: its hash's low bits.
fn home(key: &Key, slots: u64) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[..8]);
    u64::from_le_bytes(b) & (slots - 1)
}

fn full() -> StoreError {
    StoreError::Io(std::io::Error::other("the idempotency index is full"))
}

/// The all-zero key marks an empty slot: a key that hashes to it is kept
/// as another (2^-128 odds; a lookup checks the record it finds anyway).
fn stored(key: &Key) -> Key {
    match *key {
        EMPTY => {
            let mut k = EMPTY;
            k[15] = 1;
            k
        }
        k => k,
    }
}

fn parse(raw: &[u8]) -> Slot {
    let mut key = EMPTY;
    key.copy_from_slice(&raw[..16]);
    if key == EMPTY {
        return Slot::Empty;
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&raw[16..SLOT]);
    Slot::Taken(key, (id != [0; 16]).then_some(RequestId(id)))
}

/// Magic, slots, mark, and a CRC of them: 36 bytes, within one sector.
fn header(slots: u64, mark: Position) -> [u8; 36] {
    let mut h = [0u8; 36];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&slots.to_le_bytes());
    h[16..24].copy_from_slice(&mark.segment.to_le_bytes());
    h[24..32].copy_from_slice(&mark.offset.to_le_bytes());
    let crc = crc32fast::hash(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

fn read_header(file: &File) -> Result<Option<(u64, Position)>, StoreError> {
    let mut h = [0u8; 36];
    if file.metadata()?.len() < HEADER {
        return Ok(None);
    }
    file.read_exact_at(&mut h, 0)?;
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let crc = u32::from_le_bytes([h[32], h[33], h[34], h[35]]);
    let slots = word(8);
    let len = file.metadata()?.len();
    let needs = slots
        .checked_mul(SLOT as u64)
        .and_then(|b| b.checked_add(HEADER));
    if &h[..8] != MAGIC
        || crc != crc32fast::hash(&h[..32])
        || !slots.is_power_of_two()
        || needs.is_none_or(|n| len < n)
    {
        return Ok(None);
    }
    let mark = Position {
        segment: word(16),
        offset: word(24),
    };
    Ok(Some((slots, mark)))
}

mod build;
#[cfg(test)]
mod tests;
