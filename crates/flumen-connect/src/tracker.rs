//! Which Kafka offsets may be committed. Records of a partition are delivered in
//! offset order and finish in any order; a partition's commit point is the lowest
//! offset still in flight, or one past the last delivered when none is — so a commit
//! never passes a record whose outcome is not yet written, and a restart resumes at
//! the first unfinished record (records after it that did finish are seen again:
//! at-least-once; the duplicates are what was delivered after the oldest unfinished
//! record, usually about the pipeline's capacity, more behind a slow or retried one).

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    /// One past the last delivered offset.
    next: Option<i64>,
    /// The last commit point handed out.
    committed: Option<i64>,
}

impl Partition {
    fn point(&self) -> Option<i64> {
        self.in_flight.first().copied().or(self.next)
    }
}

/// What a delivery was, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The partition's first since it was assigned.
    First,
    /// The one after the last delivered.
    Next,
    /// After a gap: the offsets `first..=last` were not delivered.
    After(i64, i64),
}

/// Commit points per partition (pure; unit-tested).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: BTreeMap<i32, Partition>,
}

impl OffsetTracker {
    /// A record was handed to the pipeline. Returns the offsets skipped since the
    /// last delivered one of its partition, if any (`first..=last`): a compacted topic
    /// has such gaps; otherwise they are records the broker did not serve.
    pub fn delivered(&mut self, partition: i32, offset: i64) -> Delivered {
        let p = self.partitions.entry(partition).or_default();
        p.in_flight.insert(offset);
        let seen = match p.next {
            None => Delivered::First,
            Some(n) if offset > n => Delivered::After(n, offset - 1),
            Some(_) => Delivered::Next,
        };
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        seen
    }

    /// A record's outcome is durably written.
    pub fn done(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.in_flight.remove(&offset);
        }
    }

    /// Records in flight, all partitions together.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.in_flight.len()).sum()
    }

    /// The partitions whose commit point moved past the last one committed, with the
    /// offset to commit (Kafka's "next offset to read"); nothing is marked: see
    /// [`OffsetTracker::committed`].
    pub fn moved(&self) -> Vec<(i32, i64)> {
        self.partitions
            .iter()
            .filter_map(|(&id, p)| {
                let point = p.point()?;
                p.committed.is_none_or(|c| point > c).then_some((id, point))
            })
            .collect()
    }

    /// The broker took these commit points (a partition forgotten since is ignored).
    pub fn committed(&mut self, points: &[(i32, i64)]) {
        for &(id, point) in points {
            if let Some(p) = self.partitions.get_mut(&id) {
                p.committed = Some(p.committed.map_or(point, |c| c.max(point)));
            }
        }
    }

    /// Forgets a partition (revoked in a rebalance: its new owner starts from the last
    /// commit).
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl OffsetTracker {
        /// What moved, taken by the broker at once (the tests' commits succeed).
        fn commit_moved(&mut self) -> Vec<(i32, i64)> {
            let out = self.moved();
            self.committed(&out);
            out
        }
    }

    #[test]
    fn commits_advance_contiguously_and_never_past_an_in_flight_record() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.delivered(0, o);
        }
        t.delivered(1, 0);
        assert_eq!(t.commit_moved(), vec![(0, 10), (1, 0)], "nothing done yet");
        t.done(0, 12);
        t.done(0, 11);
        assert_eq!(t.commit_moved(), vec![], "10 is still in flight");
        t.done(0, 10);
        assert_eq!(t.commit_moved(), vec![(0, 13)]);
        t.done(1, 0);
        t.done(0, 13);
        t.done(0, 14);
        assert_eq!(t.commit_moved(), vec![(0, 15), (1, 1)]);
        assert_eq!(t.commit_moved(), vec![], "nothing moved");
        assert_eq!(t.in_flight(), 0);
        t.forget(0);
        t.delivered(0, 3);
        assert_eq!(t.commit_moved(), vec![(0, 3)]);
    }

    #[test]
    fn deliveries_are_told_first_next_or_after_a_gap() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.delivered(1, 5), Delivered::First);
        assert_eq!(t.delivered(1, 6), Delivered::Next);
        assert_eq!(t.delivered(1, 9), Delivered::After(7, 8));
        t.forget(1);
        assert_eq!(t.delivered(1, 2), Delivered::First, "after a revocation");
    }

    #[test]
    fn a_commit_that_failed_is_offered_again_until_it_is_taken() {
        let mut t = OffsetTracker::default();
        for o in 0..4 {
            t.delivered(0, o);
        }
        t.done(0, 0);
        t.done(0, 1);
        assert_eq!(t.moved(), vec![(0, 2)]);
        // The commit failed (broker away): nothing was marked, so it is offered again,
        // moved on by what finished meanwhile.
        t.done(0, 2);
        assert_eq!(t.moved(), vec![(0, 3)]);
        t.committed(&[(0, 3)]);
        assert_eq!(t.moved(), vec![]);
        // A late confirmation of an older point does not move the mark back.
        t.committed(&[(0, 2)]);
        t.done(0, 3);
        assert_eq!(t.moved(), vec![(0, 4)]);
        t.forget(0);
        t.committed(&[(0, 4)]);
        assert_eq!(t.moved(), vec![]);
    }

    #[test]
    fn random_completion_orders_keep_the_invariant() {
        // A seeded xorshift: deliver 0..200 in order, finish in a random order; the
        // commit point must always equal the lowest unfinished offset.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..50 {
            let mut t = OffsetTracker::default();
            let mut open: Vec<i64> = (0..200).collect();
            for o in 0..200 {
                t.delivered(7, o);
            }
            let mut last = None;
            while !open.is_empty() {
                let i = (next() % open.len() as u64) as usize;
                t.done(7, open.swap_remove(i));
                let want = open.iter().min().copied().unwrap_or(200);
                if let Some((7, point)) = t.commit_moved().first().copied() {
                    assert_eq!(point, want);
                    assert!(last.is_none_or(|l| point > l));
                    last = Some(point);
                }
            }
            assert_eq!(last, Some(200));
        }
    }
}
