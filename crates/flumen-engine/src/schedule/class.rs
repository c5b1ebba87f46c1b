//! One priority class's queue: its tenants' queues, merged by fair-queuing tags
//! (see the [schedule's docs](super)).

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

/// A virtual-time tag (finite, never NaN) with a total order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Tag(f64);

impl Eq for Tag {}
impl PartialOrd for Tag {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Tag {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

pub(super) struct TenantQueue<T> {
    pub(super) name: Option<Arc<str>>,
    pub(super) weight: f64,
    /// Nearest deadline first.
    pub(super) items: VecDeque<T>,
    /// The tag of its last record sent.
    pub(super) finish: f64,
}

impl<T> TenantQueue<T> {
    /// The tag of its `i`-th queued record (0-based), in a class at virtual time `v`.
    pub(super) fn tag(&self, v: f64, i: usize) -> f64 {
        self.finish.max(v) + (i + 1) as f64 / self.weight
    }
}

pub(super) struct ClassQueue<T> {
    pub(super) tenants: Vec<TenantQueue<T>>,
    pub(super) by_name: HashMap<Option<Arc<str>>, usize>,
    pub(super) vtime: f64,
    pub(super) len: usize,
    /// Records owed to this class by the share rule.
    pub(super) owed: f64,
}

impl<T> Default for ClassQueue<T> {
    fn default() -> Self {
        ClassQueue {
            tenants: Vec::new(),
            by_name: HashMap::new(),
            vtime: 0.0,
            len: 0,
            owed: 0.0,
        }
    }
}

impl<T> ClassQueue<T> {
    /// The index of the queue of `tenant`, if it has one. Records without a tenant
    /// (the common case) are found without hashing.
    pub(super) fn find(&self, tenant: &Option<Arc<str>>) -> Option<usize> {
        match tenant {
            None => self.tenants.iter().position(|t| t.name.is_none()),
            Some(_) => self.by_name.get(tenant).copied(),
        }
    }

    /// Its records in sending order.
    pub(super) fn iter(&self) -> ClassIter<'_, T> {
        // One tenant with records (the common case): its queue as it is, no heap.
        if let Some(k) = self.only_tenant() {
            return ClassIter {
                class: self,
                heap: BinaryHeap::new(),
                single: Some((k, 0)),
            };
        }
        let heap = self
            .tenants
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.items.is_empty())
            .map(|(k, t)| Reverse((Tag(t.tag(self.vtime, 0)), k, 0)))
            .collect();
        ClassIter {
            class: self,
            heap,
            single: None,
        }
    }

    /// The one tenant with records queued, when there is exactly one.
    pub(super) fn only_tenant(&self) -> Option<usize> {
        let mut with = self
            .tenants
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.items.is_empty());
        let (k, _) = with.next()?;
        with.next().is_none().then_some(k)
    }

    /// Removes its first `n` records in sending order (appended to `out`).
    pub(super) fn take(&mut self, n: usize, out: &mut Vec<T>) {
        if let Some(k) = self.only_tenant() {
            let v = self.vtime;
            let t = &mut self.tenants[k];
            let n = n.min(t.items.len());
            let start = t.finish.max(v);
            out.extend(t.items.drain(..n));
            t.finish = start + n as f64 / t.weight;
            self.vtime = t.finish;
            self.len -= n;
            self.prune();
            self.restart_if_empty();
            return;
        }
        let mut counts = vec![0usize; self.tenants.len()];
        let mut last = self.vtime;
        for (k, tag) in self.iter().positions().take(n) {
            counts[k] += 1;
            last = tag;
        }
        // Records leave in their tenants' order; across tenants, interleaved by tag
        // as they were scheduled.
        let mut taken: Vec<(Tag, T)> = Vec::with_capacity(n);
        for (k, count) in counts.into_iter().enumerate() {
            if count == 0 {
                continue;
            }
            let v = self.vtime;
            let t = &mut self.tenants[k];
            let start = t.finish.max(v);
            for i in 0..count {
                let item = t.items.pop_front().expect("counted from the queue");
                taken.push((Tag(start + (i + 1) as f64 / t.weight), item));
            }
            t.finish = start + count as f64 / t.weight;
            self.len -= count;
        }
        taken.sort_by_key(|(tag, _)| *tag);
        out.extend(taken.into_iter().map(|(_, item)| item));
        self.vtime = last;
        self.prune();
        self.restart_if_empty();
    }

    /// An empty class starts its virtual time again: tags stay small numbers (a
    /// light tenant's tag grows by 1/weight a record), and no tenant keeps a lead.
    pub(super) fn restart_if_empty(&mut self) {
        if self.len == 0 {
            self.vtime = 0.0;
            for t in &mut self.tenants {
                t.finish = 0.0;
            }
            self.owed = 0.0;
        }
    }

    /// Forgets tenants with nothing queued and no tag ahead of the virtual time
    /// (they would start at it anyway), once there are many: keys that come and go
    /// leave nothing behind.
    fn prune(&mut self) {
        if self.tenants.len() < 64 {
            return;
        }
        let v = self.vtime;
        self.tenants.retain(|t| !t.items.is_empty() || t.finish > v);
        self.by_name = self
            .tenants
            .iter()
            .enumerate()
            .map(|(k, t)| (t.name.clone(), k))
            .collect();
    }
}

/// A class's records in sending order: a merge of its tenants' queues by tag.
pub(super) struct ClassIter<'a, T> {
    pub(super) class: &'a ClassQueue<T>,
    pub(super) heap: BinaryHeap<Reverse<(Tag, usize, usize)>>,
    /// With one tenant: its index and the next position.
    pub(super) single: Option<(usize, usize)>,
}

impl<T> Clone for ClassIter<'_, T> {
    fn clone(&self) -> Self {
        ClassIter {
            class: self.class,
            heap: self.heap.clone(),
            single: self.single,
        }
    }
}

impl<'a, T> ClassIter<'a, T> {
    /// The next record's tenant index and tag, without the record.
    pub(super) fn next_position(&mut self) -> Option<(usize, usize, f64)> {
        if let Some((k, i)) = &mut self.single {
            let t = &self.class.tenants[*k];
            if *i >= t.items.len() {
                return None;
            }
            let at = *i;
            *i += 1;
            return Some((*k, at, t.tag(self.class.vtime, at)));
        }
        let Reverse((tag, k, i)) = self.heap.pop()?;
        let t = &self.class.tenants[k];
        if i + 1 < t.items.len() {
            self.heap
                .push(Reverse((Tag(t.tag(self.class.vtime, i + 1)), k, i + 1)));
        }
        Some((k, i, tag.0))
    }

    fn positions(mut self) -> impl Iterator<Item = (usize, f64)> + 'a {
        std::iter::from_fn(move || self.next_position().map(|(k, _, tag)| (k, tag)))
    }
}

impl<'a, T> Iterator for ClassIter<'a, T> {
    type Item = &'a T;
    fn next(&mut self) -> Option<&'a T> {
        if let Some((k, i)) = &mut self.single {
            let item = self.class.tenants[*k].items.get(*i)?;
            *i += 1;
            return Some(item);
        }
        let (k, i, _) = self.next_position()?;
        Some(&self.class.tenants[k].items[i])
    }
}
