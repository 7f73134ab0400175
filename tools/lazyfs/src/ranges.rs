//! Byte ranges held in memory on top of a file: what was written and not
//! yet made durable. Non-overlapping, keyed by start offset; a later write
//! replaces what it overlaps. Adjacent writes merge, so the sequential
//! appends that logs and body segments make stay one growing buffer.

use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct Ranges {
    map: BTreeMap<u64, Vec<u8>>,
    /// Bytes held, kept so the status report costs nothing.
    bytes: u64,
}

fn end_of(start: u64, v: &[u8]) -> u64 {
    start + v.len() as u64
}

impl Ranges {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    /// The ranges in offset order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.map.iter().map(|(s, v)| (*s, v.as_slice()))
    }

    /// Records a write of `data` at `offset`, replacing what it overlaps.
    pub fn insert(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        // The common case: an append right after the last range written.
        let nothing_after = self.map.range(offset..=end).next().is_none();
        if nothing_after
            && let Some((&s, v)) = self.map.range_mut(..offset).next_back()
            && end_of(s, v) == offset
        {
            v.extend_from_slice(data);
            self.bytes += data.len() as u64;
            return;
        }
        self.punch(offset, end);
        let (mut start, mut buf) = (offset, data.to_vec());
        if let Some((&s, v)) = self.map.range(..offset).next_back()
            && end_of(s, v) == offset
            && let Some(mut left) = self.map.remove(&s)
        {
            left.extend_from_slice(&buf);
            (start, buf) = (s, left);
        }
        if let Some(right) = self.map.remove(&end) {
            buf.extend_from_slice(&right);
        }
        self.bytes += data.len() as u64;
        self.map.insert(start, buf);
    }

    /// Forgets every byte in `[start, end)`, splitting ranges that cross it.
    pub fn punch(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // Walking back from the last range that starts before `end`, ranges
        // overlap until one ends at or before `start` (they are disjoint).
        let hit: Vec<u64> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(s, v)| end_of(**s, v) > start)
            .map(|(s, _)| *s)
            .collect();
        for s in hit {
            let Some(v) = self.map.remove(&s) else {
                continue;
            };
            let e = end_of(s, &v);
            let (cut_from, cut_to) = (start.max(s), end.min(e));
            self.bytes -= cut_to - cut_from;
            if s < start {
                self.map.insert(s, v[..(start - s) as usize].to_vec());
            }
            if e > end {
                self.map.insert(end, v[(end - s) as usize..].to_vec());
            }
        }
    }

    /// Copies the held bytes that fall inside `buf` (which starts at
    /// `offset`) over it.
    pub fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        for (s, v) in self
            .map
            .range(..end)
            .rev()
            .take_while(|(s, v)| end_of(**s, v) > offset)
        {
            let from = offset.max(*s);
            let to = end.min(end_of(*s, v));
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&v[(from - s) as usize..(to - s) as usize]);
        }
    }

    /// Moves every range of `other` in, as if written after ours.
    pub fn absorb(&mut self, other: Ranges) {
        for (s, v) in other.map {
            self.insert(s, &v);
        }
    }

    /// `(start, end)` of every range.
    pub fn spans(&self) -> Vec<(u64, u64)> {
        self.map.iter().map(|(s, v)| (*s, end_of(*s, v))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-per-slot model to check the map against.
    fn model_apply(model: &mut Vec<Option<u8>>, offset: usize, data: &[u8]) {
        if model.len() < offset + data.len() {
            model.resize(offset + data.len(), None);
        }
        for (i, b) in data.iter().enumerate() {
            model[offset + i] = Some(*b);
        }
    }

    fn check(r: &Ranges, model: &[Option<u8>]) {
        let mut buf = vec![0xEEu8; model.len() + 8];
        r.overlay(0, &mut buf);
        for (i, m) in model.iter().enumerate() {
            assert_eq!(buf[i], m.unwrap_or(0xEE), "byte {i}");
        }
        let held = model.iter().filter(|m| m.is_some()).count() as u64;
        assert_eq!(r.bytes(), held);
        let spans = r.spans();
        for w in spans.windows(2) {
            assert!(w[0].1 < w[1].0, "disjoint and not adjacent: {spans:?}");
        }
    }

    #[test]
    fn random_writes_and_punches_match_a_byte_model() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let (mut r, mut model) = (Ranges::default(), Vec::new());
            for step in 0..40u8 {
                let offset = (next() % 200) as usize;
                let len = (next() % 40) as usize;
                if next() % 5 == 0 {
                    r.punch(offset as u64, (offset + len) as u64);
                    for m in model.iter_mut().skip(offset).take(len) {
                        *m = None;
                    }
                } else {
                    let data: Vec<u8> = (0..len).map(|i| step.wrapping_add(i as u8)).collect();
                    r.insert(offset as u64, &data);
                    model_apply(&mut model, offset, &data);
                }
                check(&r, &model);
            }
        }
    }

    #[test]
    fn appends_grow_one_range_and_overlay_reads_a_window() {
        let mut r = Ranges::default();
        r.insert(0, b"abc");
        r.insert(3, b"def");
        r.insert(6, b"g");
        assert_eq!(r.spans(), vec![(0, 7)]);
        let mut buf = [b'.'; 4];
        r.overlay(2, &mut buf);
        assert_eq!(&buf, b"cdef");
        r.punch(1, 6);
        assert_eq!(r.spans(), vec![(0, 1), (6, 7)]);
        let mut other = Ranges::default();
        other.insert(0, b"XY");
        r.absorb(other);
        let mut buf = [b'.'; 7];
        r.overlay(0, &mut buf);
        assert_eq!(&buf, b"XY....g");
    }
}
