//! The contiguous commit watermark of one partition.
//!
//! Events of a partition finish out of order (different keys run concurrently), but an
//! offset may only be committed once every event at or below it has finished. The
//! watermark tracks the offsets handed out and not yet finished; what may be committed is
//! the lowest unfinished offset, or one past the highest tracked when none is unfinished.

use std::collections::BTreeSet;

/// Commit bookkeeping for one partition.
#[derive(Clone, Debug)]
pub struct Watermark {
    pending: BTreeSet<u64>,
    /// Finished offsets above the lowest unfinished one: what a checkpoint records so a
    /// replay from the committable position skips them.
    done: BTreeSet<u64>,
    /// Offsets a checkpoint recorded as done, not yet seen again: skipped when read.
    skip: BTreeSet<u64>,
    /// Next offset to commit if nothing were pending: one past the highest tracked offset.
    next: u64,
    committed: u64,
}

impl Watermark {
    /// A partition whose committed position (next offset to handle) is `start`.
    pub fn new(start: u64) -> Self {
        Self {
            pending: BTreeSet::new(),
            done: BTreeSet::new(),
            skip: BTreeSet::new(),
            next: start,
            committed: start,
        }
    }

    /// A partition restored from a checkpoint: every offset below `start` is done, and
    /// so are `done` (above it), which [`Watermark::track`] will report as done.
    pub fn restored(start: u64, done: impl IntoIterator<Item = u64>) -> Self {
        let mut w = Self::new(start);
        w.skip = done.into_iter().filter(|o| *o >= start).collect();
        w
    }

    /// An event at `offset` was read. Offsets must be tracked in increasing order. Returns
    /// `false` if a checkpoint already recorded it as done: it is not handled again.
    pub fn track(&mut self, offset: u64) -> bool {
        debug_assert!(offset >= self.next, "offsets tracked out of order");
        self.next = self.next.max(offset + 1);
        if self.skip.remove(&offset) {
            if !self.pending.is_empty() {
                self.done.insert(offset);
            }
            return false;
        }
        self.pending.insert(offset);
        true
    }

    /// The event at `offset` finished (handled, or dead-lettered).
    pub fn complete(&mut self, offset: u64) {
        if !self.pending.remove(&offset) {
            return;
        }
        // Only finished offsets above the lowest unfinished one need remembering.
        match self.pending.first().copied() {
            Some(low) if low < offset => {
                self.done.insert(offset);
            }
            Some(low) => self.done = self.done.split_off(&low),
            None => self.done.clear(),
        }
    }

    /// Finished offsets at or above [`Watermark::committable`], plus those a restored
    /// checkpoint recorded and that were not read again yet.
    pub fn done_above(&self) -> Vec<u64> {
        let from = self.committable();
        let mut out: Vec<u64> = self
            .done
            .iter()
            .chain(self.skip.range(from..))
            .copied()
            .collect();
        out.sort_unstable();
        out
    }

    /// The position that may be committed now: every offset below it is finished.
    pub fn committable(&self) -> u64 {
        self.pending.first().copied().unwrap_or(self.next)
    }

    /// If the committable position moved past the last commit, mark it committed and return it.
    pub fn take_commit(&mut self) -> Option<u64> {
        let c = self.committable();
        (c > self.committed).then(|| {
            self.committed = c;
            c
        })
    }

    /// A commit taken with [`Watermark::take_commit`] failed: go back to `previous`.
    pub fn revert_commit(&mut self, previous: u64) {
        self.committed = previous.min(self.committed);
    }

    /// One past the highest offset tracked: anything below was already seen.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// The last committed position.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Events tracked and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever order events finish in, the committable position is exactly the
        /// smallest unfinished offset, and it never moves backwards.
        #[test]
        fn committable_is_lowest_unfinished(
            start in 0u64..1000,
            gaps in proptest::collection::vec(1u64..4, 1..200),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 1..200),
        ) {
            let mut w = Watermark::new(start);
            let mut offsets = Vec::new();
            let mut o = start;
            for g in &gaps {
                offsets.push(o);
                prop_assert!(w.track(o));
                o += g;
            }
            let end = offsets.last().unwrap() + 1;
            let mut unfinished: BTreeSet<u64> = offsets.iter().copied().collect();
            let mut last = w.committable();
            prop_assert_eq!(last, start);
            for idx in order {
                if unfinished.is_empty() { break; }
                let pick = *idx.get(&unfinished.iter().copied().collect::<Vec<_>>());
                unfinished.remove(&pick);
                w.complete(pick);
                let c = w.committable();
                prop_assert!(c >= last, "watermark moved backwards");
                let expect = unfinished.first().copied().unwrap_or(end);
                prop_assert_eq!(c, expect);
                // Nothing at or above an unfinished offset is ever committable.
                for u in &unfinished { prop_assert!(c <= *u); }
                last = c;
                if let Some(taken) = w.take_commit() { prop_assert_eq!(taken, c); }
            }
        }
    }

    proptest! {
        /// The checkpoint invariant: what a checkpoint records (everything below the
        /// committable position, and the done offsets above it) is exactly the set of
        /// finished events at that moment; restored from it after a crash, the replay
        /// handles exactly the events that were not finished, each once.
        #[test]
        fn a_checkpoint_covers_exactly_the_finished_events(
            start in 0u64..100,
            gaps in proptest::collection::vec(1u64..3, 1..120),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..120),
            crash_after in 0usize..120,
        ) {
            let mut offsets = Vec::new();
            let mut o = start;
            for g in &gaps {
                offsets.push(o);
                o += g;
            }
            let mut w = Watermark::new(start);
            for o in &offsets {
                prop_assert!(w.track(*o));
            }
            let mut finished = BTreeSet::new();
            let mut unfinished: Vec<u64> = offsets.clone();
            for idx in order.iter().take(crash_after) {
                if unfinished.is_empty() { break; }
                let pick = unfinished.remove(idx.index(unfinished.len()));
                w.complete(pick);
                finished.insert(pick);
            }
            // The checkpoint.
            let (next, done) = (w.committable(), w.done_above());
            let covered: BTreeSet<u64> = offsets
                .iter()
                .copied()
                .filter(|o| *o < next || done.contains(o))
                .collect();
            prop_assert_eq!(&covered, &finished);
            // The replay after a crash reads from `next` on.
            let mut r = Watermark::restored(next, done);
            let replayed: BTreeSet<u64> =
                offsets.iter().copied().filter(|o| *o >= next && r.track(*o)).collect();
            let expected: BTreeSet<u64> =
                offsets.iter().copied().filter(|o| !finished.contains(o)).collect();
            prop_assert_eq!(&replayed, &expected);
            for o in &replayed {
                r.complete(*o);
            }
            prop_assert_eq!(r.committable(), offsets.last().unwrap() + 1);
            prop_assert!(r.done_above().is_empty());
        }
    }

    #[test]
    fn a_restored_watermark_skips_what_its_checkpoint_recorded() {
        let mut w = Watermark::new(0);
        for o in 0..5 {
            assert!(w.track(o));
        }
        w.complete(3);
        w.complete(0);
        w.complete(4);
        assert_eq!((w.committable(), w.done_above()), (1, vec![3, 4]));
        // A crash here: the checkpoint holds (1, [3, 4]). The replay handles 1 and 2 only.
        let mut r = Watermark::restored(1, [3, 4]);
        let handled: Vec<u64> = (1..6).filter(|o| r.track(*o)).collect();
        assert_eq!(handled, vec![1, 2, 5]);
        assert_eq!(r.done_above(), vec![3, 4]);
        r.complete(2);
        r.complete(1);
        assert_eq!((r.committable(), r.done_above()), (5, vec![]));
        r.complete(5);
        assert_eq!(r.committable(), 6);
    }

    #[test]
    fn commit_only_moves_forward() {
        let mut w = Watermark::new(10);
        assert_eq!(w.take_commit(), None);
        assert!(w.track(10));
        assert!(w.track(11));
        w.complete(11);
        assert_eq!(w.take_commit(), None);
        w.complete(10);
        assert_eq!(w.take_commit(), Some(12));
        assert_eq!(w.take_commit(), None);
        assert_eq!(w.committed(), 12);
    }
}
