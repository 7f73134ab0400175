//! The table alone: sets, removals, growth, a crash's duplicates, a
//! damaged header.

use super::*;

fn key(i: u64) -> Key {
    use sha2::Digest;
    let d = sha2::Sha256::digest(i.to_le_bytes());
    d[..16].try_into().unwrap()
}

fn id(i: u64) -> RequestId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(i + 1).to_be_bytes());
    RequestId(b)
}

fn create(dir: &Path, entries: &[(Key, RequestId)], mark: Position) -> KeyFile {
    KeyFile::create(dir, entries.len() as u64, mark, |put| {
        entries.iter().try_for_each(|(k, id)| put(k, *id))
    })
    .unwrap()
}

fn at(offset: u64) -> Position {
    Position { segment: 1, offset }
}

#[test]
fn keys_are_set_removed_and_set_again_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let t = create(dir.path(), &[(key(1), id(1))], at(0));
    assert_eq!(t.get(&key(1)).unwrap(), Some(id(1)));
    assert_eq!(t.get(&key(2)).unwrap(), None);
    t.write(&[(key(2), Some(id(2))), (key(1), None)]).unwrap();
    assert_eq!(t.get(&key(1)).unwrap(), None, "removed");
    assert_eq!(t.get(&key(2)).unwrap(), Some(id(2)));
    t.write(&[(key(1), Some(id(3))), (key(9), None)]).unwrap();
    assert_eq!(t.get(&key(1)).unwrap(), Some(id(3)), "its slot again");
    // Key 9, removed without being there, left a removed slot.
    assert_eq!(t.state.lock().unwrap().used, 3);
    t.mark(at(7)).unwrap();
    drop(t);
    let (t, mark) = KeyFile::open(dir.path()).unwrap().expect("there");
    assert_eq!(mark, at(7));
    assert_eq!(t.get(&key(1)).unwrap(), Some(id(3)));
    assert_eq!(t.get(&key(2)).unwrap(), Some(id(2)));
    assert_eq!(t.state.lock().unwrap().used, 3, "counted on open");
}

#[test]
fn a_table_grows_past_half_full_and_keeps_every_live_key() {
    grows_and_keeps_every_live_key(IN_MEMORY);
    // Built a window of 2,048 slots at a time.
    grows_and_keeps_every_live_key(64 << 10);
}

fn grows_and_keeps_every_live_key(in_memory: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut t = create(dir.path(), &[], at(0));
    t.in_memory = in_memory;
    t.mark(at(3)).unwrap();
    let n = MIN_SLOTS * 3 / 2;
    for chunk in (0..n).collect::<Vec<_>>().chunks(4096) {
        let sets: Vec<_> = chunk.iter().map(|&i| (key(i), Some(id(i)))).collect();
        t.write(&sets).unwrap();
    }
    // Every other key removed, then the table grows again.
    let gone: Vec<_> = (0..n).step_by(2).map(|i| (key(i), None)).collect();
    t.write(&gone).unwrap();
    let more: Vec<_> = (n..2 * n).map(|i| (key(i), Some(id(i)))).collect();
    t.write(&more).unwrap();
    let slots = t.table.read().unwrap().slots;
    assert!(slots >= 4 * MIN_SLOTS, "grown: {slots}");
    assert!(t.state.lock().unwrap().used * 2 <= slots);
    for i in 0..2 * n {
        let want = (i >= n || i % 2 == 1).then(|| id(i));
        assert_eq!(t.get(&key(i)).unwrap(), want, "key {i}");
    }
    drop(t);
    let (t, mark) = KeyFile::open(dir.path()).unwrap().unwrap();
    assert_eq!(mark, at(3), "a grown table keeps the mark");
    assert_eq!(t.get(&key(2 * n - 1)).unwrap(), Some(id(2 * n - 1)));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, [NAME], "nothing but the table");
}

#[test]
fn a_key_found_twice_is_the_first_and_growing_keeps_only_that() {
    let dir = tempfile::tempdir().unwrap();
    let t = create(dir.path(), &[], at(0));
    // As a crash can leave it: the key set again before a slot that
    // held it further along (the slot before was emptied).
    let table = t.table.read().unwrap();
    let home = table.home(&key(5));
    let mut raw = [0u8; SLOT];
    raw[..16].copy_from_slice(&key(5));
    raw[16..].copy_from_slice(id(50).as_bytes());
    let behind = (home + 2) % table.slots;
    table
        .file
        .write_all_at(&raw, HEADER + behind * SLOT as u64)
        .unwrap();
    drop(table);
    t.state.lock().unwrap().used = 1;
    t.write(&[(key(5), Some(id(5)))]).unwrap();
    assert_eq!(t.get(&key(5)).unwrap(), Some(id(5)));
    // Removed, the first slot still answers: not the older one behind.
    t.write(&[(key(5), None)]).unwrap();
    assert_eq!(t.get(&key(5)).unwrap(), None);
    t.write(&[(key(5), Some(id(6)))]).unwrap();
    let mut st = t.state.lock().unwrap();
    t.rebuild(&mut st, 0).unwrap();
    drop(st);
    assert_eq!(t.get(&key(5)).unwrap(), Some(id(6)));
    let live = t.table.read().unwrap().count(|id| id.is_some()).unwrap();
    assert_eq!(live, 1, "the older one is gone");
}

#[test]
fn a_damaged_header_is_no_table() {
    let dir = tempfile::tempdir().unwrap();
    drop(create(dir.path(), &[(key(1), id(1))], at(4)));
    let f = OpenOptions::new()
        .write(true)
        .open(dir.path().join(NAME))
        .unwrap();
    f.write_all_at(&[0xff], 20).unwrap();
    assert!(KeyFile::open(dir.path()).unwrap().is_none());
}

/// Writes `key` → `id` at slot `at`, as a crash can leave a slot.
fn plant(t: &KeyFile, at: u64, key: &Key, id: RequestId) {
    let table = t.table.read().unwrap();
    let mut raw = [0u8; SLOT];
    raw[..16].copy_from_slice(key);
    raw[16..].copy_from_slice(id.as_bytes());
    let at = at % table.slots;
    table
        .file
        .write_all_at(&raw, HEADER + at * SLOT as u64)
        .unwrap();
    t.state.lock().unwrap().used += 1;
}

#[test]
fn an_older_copy_past_an_emptied_slot_stays_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let t = create(dir.path(), &[], at(0));
    let (h, other) = {
        let table = t.table.read().unwrap();
        let h = table.home(&key(5));
        (h, (6..).find(|&i| table.home(&key(i)) == h).unwrap())
    };
    // Key 5's older copy one past its home, the home emptied by a crash;
    // then the journal removes key 5, and another key of that home comes.
    plant(&t, h + 1, &key(5), id(50));
    t.write(&[(key(5), None)]).unwrap();
    t.write(&[(key(other), Some(id(7)))]).unwrap();
    assert_eq!(t.get(&key(5)).unwrap(), None);
    assert_eq!(t.get(&key(other)).unwrap(), Some(id(7)));
    // A copy no lookup reaches (an empty slot before it) is not rebuilt.
    let lost = t.table.read().unwrap().home(&key(9));
    plant(&t, lost + 2, &key(9), id(90));
    assert_eq!(t.get(&key(9)).unwrap(), None);
    let mut st = t.state.lock().unwrap();
    t.rebuild(&mut st, 0).unwrap();
    drop(st);
    assert_eq!(t.get(&key(9)).unwrap(), None, "not brought back");
    assert_eq!(t.get(&key(5)).unwrap(), None);
    assert_eq!(t.get(&key(other)).unwrap(), Some(id(7)));
}

#[test]
fn keys_at_the_last_slot_go_on_at_the_first() {
    let last: Vec<u64> = (0..)
        .filter(|i| home(&stored(&key(*i)), MIN_SLOTS) == MIN_SLOTS - 1)
        .take(3)
        .collect();
    let entries: Vec<_> = last.iter().map(|&i| (key(i), id(i))).collect();
    let dir = tempfile::tempdir().unwrap();
    let t = create(dir.path(), &entries, at(0));
    assert_eq!(t.table.read().unwrap().slots, MIN_SLOTS);
    for &i in &last {
        assert_eq!(t.get(&key(i)).unwrap(), Some(id(i)), "key {i}");
    }
    let first = t.table.read().unwrap().find(&key(last[2])).unwrap().0;
    assert_eq!(first, Some(1), "wrapped around");
}

#[test]
fn without_room_to_rebuild_new_keys_are_refused_past_three_quarters() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = create(dir.path(), &[], at(0));
    t.free = |_| Ok(0);
    let fill = |t: &KeyFile, keys: std::ops::Range<u64>| {
        let sets: Vec<_> = keys.map(|i| (key(i), Some(id(i)))).collect();
        t.write(&sets).unwrap();
    };
    let (a, b) = (MIN_SLOTS * 5 / 8, MIN_SLOTS * 7 / 8);
    fill(&t, 0..a);
    assert_eq!(t.table.read().unwrap().slots, MIN_SLOTS, "not rebuilt");
    assert!(!t.crowded());
    fill(&t, a..b);
    assert!(t.crowded(), "over 3/4 without room");
    for i in 0..b {
        assert_eq!(t.get(&key(i)).unwrap(), Some(id(i)));
    }
    // Room again: the next checkpoint rebuilds, with or without changes,
    // and keys are taken again.
    t.free = |_| Ok(u64::MAX);
    t.write(&[]).unwrap();
    assert!(t.table.read().unwrap().slots > MIN_SLOTS);
    assert!(!t.crowded());
    assert_eq!(t.get(&key(0)).unwrap(), Some(id(0)));
}
