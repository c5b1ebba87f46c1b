//! The order in which queued records are sent: priority classes, then fair shares
//! between tenants, then deadlines — a pure structure that the dispatcher keeps its
//! queue in and the batcher reads front to back.
//!
//! - **Classes.** A record's [`Class`] is a level, 0 the most urgent
//!   ([`Class::INTERACTIVE`]), then [`Class::DEFAULT`], [`Class::BULK`] and numbered
//!   levels to [`Class::LOWEST`]. A call is filled from the most urgent class first
//!   and gets what remains from the next ones, so a short call is topped up with
//!   lower-class records rather than sent short. No call is pre-empted: an urgent
//!   record waits at most for one slot to free.
//! - **A minimum share, not aging.** While a less urgent class has records waiting
//!   and others are sent ahead of it, it is owed [`SchedulingConfig::min_share`] of
//!   each call's records; once it is owed a whole record, its owed records go first.
//!   So a bulk backfill moves at no less than that share however much interactive
//!   traffic there is, and interactive traffic gives up no more than that share. A
//!   share is chosen over aging (raising a record's class as it waits) because its
//!   bound holds at every load: aging lets bulk overtake after a fixed wait whatever
//!   the interactive load, and its throughput under that load depends on the wait
//!   chosen and the arrival rate, which no operator knows in advance.
//! - **Tenants.** Within a class, each tenant's records queue apart and are taken
//!   by weighted fair queuing with finish tags, self-clocked (one record the unit
//!   of work): tenant `t`'s `i`-th queued record (from 1) is tagged
//!   `max(V, F_t) + i / w_t`, `V` the class's virtual time (the tag last sent), `F_t`
//!   the tag of `t`'s last sent record; the smallest tag goes first. A tenant that
//!   floods only lengthens its own queue; an idle tenant banks no credit; a class
//!   that empties starts its virtual time again.
//! - **Deadlines.** Within a tenant of a class, records nearer their deadline go
//!   first (records without one after those with one, in arrival order). Deadlines
//!   do not order records across tenants: a tenant with short deadlines would
//!   otherwise take every slot from one with long ones.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

/// A priority class: 0 is the most urgent. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Class(u8);

impl Class {
    /// A person is waiting: level 0.
    pub const INTERACTIVE: Class = Class(0);
    /// Records that say nothing: level 1.
    pub const DEFAULT: Class = Class(1);
    /// Throughput only (a backfill, a nightly re-embedding): level 2.
    pub const BULK: Class = Class(2);
    /// The least urgent level, 7.
    pub const LOWEST: Class = Class(7);
    /// How many levels there are.
    pub const LEVELS: usize = 8;

    /// Level `n`, if it is one (0–7).
    pub fn level(n: u8) -> Option<Class> {
        (usize::from(n) < Self::LEVELS).then_some(Class(n))
    }

    /// This class's level.
    pub fn get(self) -> u8 {
        self.0
    }

    /// The class named `name`: `interactive`, `default`, `bulk` or a level `0`–`7`.
    pub fn parse(name: &str) -> Option<Class> {
        match name.trim() {
            "interactive" => Some(Self::INTERACTIVE),
            "default" => Some(Self::DEFAULT),
            "bulk" => Some(Self::BULK),
            n => n.parse::<u8>().ok().and_then(Class::level),
        }
    }

    /// Its name: `interactive`, `default`, `bulk`, or the level's number.
    pub fn name(self) -> String {
        match self {
            Self::INTERACTIVE => "interactive".into(),
            Self::DEFAULT => "default".into(),
            Self::BULK => "bulk".into(),
            Class(n) => n.to_string(),
        }
    }
}

impl Default for Class {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Which traffic a record is: its class and its tenant with the tenant's weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Lane {
    /// Its priority class.
    pub class: Class,
    /// Its tenant; records without one are one tenant of their own.
    pub tenant: Option<Arc<str>>,
    /// The tenant's share weight (> 0) against the other tenants of its class.
    pub weight: f64,
}

impl Default for Lane {
    fn default() -> Self {
        Lane {
            class: Class::DEFAULT,
            tenant: None,
            weight: 1.0,
        }
    }
}

impl Lane {
    /// A lane of class `class`, no tenant.
    pub fn class(class: Class) -> Lane {
        Lane {
            class,
            ..Lane::default()
        }
    }

    /// A lane of class `class` for `tenant` with `weight`.
    pub fn tenant(class: Class, tenant: &str, weight: f64) -> Lane {
        Lane {
            class,
            tenant: Some(Arc::from(tenant)),
            weight,
        }
    }
}

/// How classes share an engine.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulingConfig {
    /// The share of each call's records owed to a less urgent class while it waits
    /// (0 to 0.5; default [`DEFAULT_MIN_SHARE`]): see the [module docs](self).
    pub min_share: f64,
}

/// One record in ten: a backfill keeps moving at a tenth of the engine's rate under
/// any interactive load, which loses no more than a tenth of its throughput.
pub const DEFAULT_MIN_SHARE: f64 = 0.1;

impl Default for SchedulingConfig {
    fn default() -> Self {
        SchedulingConfig {
            min_share: DEFAULT_MIN_SHARE,
        }
    }
}

/// What the schedule needs of a queued item.
pub(crate) trait Scheduled {
    fn lane(&self) -> &Lane;
    fn deadline(&self) -> Option<Instant>;
}

/// A virtual-time tag (finite, never NaN) with a total order.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tag(f64);

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

struct TenantQueue<T> {
    name: Option<Arc<str>>,
    weight: f64,
    /// Nearest deadline first.
    items: VecDeque<T>,
    /// The tag of its last record sent.
    finish: f64,
}

impl<T> TenantQueue<T> {
    /// The tag of its `i`-th queued record (0-based), in a class at virtual time `v`.
    fn tag(&self, v: f64, i: usize) -> f64 {
        self.finish.max(v) + (i + 1) as f64 / self.weight
    }
}

struct ClassQueue<T> {
    tenants: Vec<TenantQueue<T>>,
    by_name: HashMap<Option<Arc<str>>, usize>,
    vtime: f64,
    len: usize,
    /// Records owed to this class by the share rule.
    owed: f64,
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
    fn find(&self, tenant: &Option<Arc<str>>) -> Option<usize> {
        match tenant {
            None => self.tenants.iter().position(|t| t.name.is_none()),
            Some(_) => self.by_name.get(tenant).copied(),
        }
    }

    /// Its records in sending order.
    fn iter(&self) -> ClassIter<'_, T> {
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
    fn only_tenant(&self) -> Option<usize> {
        let mut with = self
            .tenants
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.items.is_empty());
        let (k, _) = with.next()?;
        with.next().is_none().then_some(k)
    }

    /// Removes its first `n` records in sending order (appended to `out`).
    fn take(&mut self, n: usize, out: &mut Vec<T>) {
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
    fn restart_if_empty(&mut self) {
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
struct ClassIter<'a, T> {
    class: &'a ClassQueue<T>,
    heap: BinaryHeap<Reverse<(Tag, usize, usize)>>,
    /// With one tenant: its index and the next position.
    single: Option<(usize, usize)>,
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
    fn next_position(&mut self) -> Option<(usize, usize, f64)> {
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

/// `a` is due no later than `b` (no deadline: last).
fn no_later(a: Option<Instant>, b: Option<Instant>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a <= b,
        (_, None) => true,
        (None, Some(_)) => false,
    }
}

/// `a` is due strictly before `b`.
fn earlier(a: Option<Instant>, b: Option<Instant>) -> bool {
    !no_later(b, a)
}

/// The queue of one engine in sending order: see the [module docs](self).
pub(crate) struct Schedule<T> {
    classes: Vec<ClassQueue<T>>,
    len: usize,
    min_share: f64,
    /// The most records a class may be owed: one call.
    cap: f64,
}

/// A run of one class's records in [`Schedule::iter`]: skip some, then take some.
#[derive(Debug, Clone, Copy, Default)]
struct Segment {
    class: u8,
    skip: u32,
    take: u32,
}

const SEGMENTS: usize = 2 * Class::LEVELS;

impl<T: Scheduled> Schedule<T> {
    /// An empty schedule; a class is owed at most `max_items` records (one call).
    pub(crate) fn new(config: &SchedulingConfig, max_items: usize) -> Self {
        Schedule {
            classes: (0..Class::LEVELS).map(|_| ClassQueue::default()).collect(),
            len: 0,
            min_share: config.min_share.clamp(0.0, 0.5),
            cap: max_items.max(1) as f64,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `item` behind the records of its lane due no later than it.
    pub(crate) fn push(&mut self, item: T) {
        self.insert(item, false);
    }

    /// Queues `item` ahead of the records of its lane due no earlier than it (a
    /// retry, which was there first).
    pub(crate) fn push_first(&mut self, item: T) {
        self.insert(item, true);
    }

    fn insert(&mut self, item: T, first: bool) {
        let lane = item.lane();
        let weight = if lane.weight.is_finite() {
            lane.weight.clamp(1e-3, 1e6)
        } else {
            1.0
        };
        let class = &mut self.classes[usize::from(lane.class.0)];
        let k = match class.find(&lane.tenant) {
            Some(k) => k,
            None => {
                class.tenants.push(TenantQueue {
                    name: lane.tenant.clone(),
                    weight,
                    items: VecDeque::new(),
                    finish: 0.0,
                });
                let k = class.tenants.len() - 1;
                class.by_name.insert(lane.tenant.clone(), k);
                k
            }
        };
        let tenant = &mut class.tenants[k];
        tenant.weight = weight;
        let due = item.deadline();
        let at = if first {
            tenant.items.partition_point(|x| earlier(x.deadline(), due))
        } else if tenant
            .items
            .back()
            .is_none_or(|x| no_later(x.deadline(), due))
        {
            tenant.items.len()
        } else {
            tenant
                .items
                .partition_point(|x| no_later(x.deadline(), due))
        };
        if at == tenant.items.len() {
            tenant.items.push_back(item);
        } else {
            tenant.items.insert(at, item);
        }
        class.len += 1;
        self.len += 1;
    }

    /// The most urgent class with records queued.
    fn top(&self) -> Option<usize> {
        self.classes.iter().position(|c| c.len > 0)
    }

    /// The runs of classes in sending order: the records owed to less urgent
    /// classes first, then every class from the most urgent.
    fn segments(&self) -> ([Segment; SEGMENTS], usize) {
        let mut out = [Segment::default(); SEGMENTS];
        let mut n = 0;
        let Some(top) = self.top() else {
            return (out, 0);
        };
        let mut owed = [0u32; Class::LEVELS];
        for (c, class) in self.classes.iter().enumerate().skip(top + 1) {
            let k = (class.owed.floor() as usize).min(class.len);
            if k > 0 {
                owed[c] = k as u32;
                out[n] = Segment {
                    class: c as u8,
                    skip: 0,
                    take: k as u32,
                };
                n += 1;
            }
        }
        for (c, class) in self.classes.iter().enumerate().skip(top) {
            if class.len as u32 > owed[c] {
                out[n] = Segment {
                    class: c as u8,
                    skip: owed[c],
                    take: u32::MAX,
                };
                n += 1;
            }
        }
        (out, n)
    }

    /// The queued records in sending order.
    pub(crate) fn iter(&self) -> Iter<'_, T> {
        let (segments, n) = self.segments();
        Iter {
            schedule: self,
            segments,
            n,
            at: 0,
            current: None,
        }
    }

    /// Removes the first `n` records in sending order, and owes each waiting less
    /// urgent class its share of them.
    pub(crate) fn take(&mut self, n: usize) -> Vec<T> {
        let n = n.min(self.len);
        let (segments, count) = self.segments();
        let mut per_class = [0usize; Class::LEVELS];
        let mut left = n;
        for s in &segments[..count] {
            if left == 0 {
                break;
            }
            let c = usize::from(s.class);
            let available = (self.classes[c].len - s.skip as usize).min(s.take as usize);
            let k = available.min(left);
            per_class[c] += k;
            left -= k;
        }
        let top = self.top();
        let waiting: [bool; Class::LEVELS] = std::array::from_fn(|c| self.classes[c].len > 0);
        let counts = per_class;
        let mut out = Vec::with_capacity(n);
        // In the order scheduled: the owed classes' records first.
        for s in &segments[..count] {
            let c = usize::from(s.class);
            let k = std::mem::take(&mut per_class[c]);
            if k > 0 {
                self.classes[c].take(k, &mut out);
                self.len -= k;
            }
        }
        for c in 0..Class::LEVELS {
            if !waiting[c] {
                continue;
            }
            let got = counts[c] as f64;
            let share = self.min_share * n as f64;
            let class = &mut self.classes[c];
            class.owed = if Some(c) == top || class.len == 0 {
                0.0
            } else {
                (class.owed + share - got).clamp(0.0, self.cap)
            };
        }
        out
    }

    /// Removes the first record in sending order (one failed before sending).
    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let (segments, count) = self.segments();
        let s = segments[..count].first()?;
        let class = &mut self.classes[usize::from(s.class)];
        if s.take != u32::MAX {
            class.owed = (class.owed - 1.0).max(0.0);
        }
        let mut out = Vec::with_capacity(1);
        class.take(1, &mut out);
        if class.len == 0 {
            class.owed = 0.0;
        }
        self.len -= 1;
        out.pop()
    }

    /// Removes the records among the first `n` in sending order for which `pred`
    /// holds (records that cannot make their deadline in the call they would ride).
    pub(crate) fn remove_in_first(&mut self, n: usize, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
        // Positions (class, tenant, index) of the matches, found in sending order.
        let mut found: Vec<(usize, usize, usize)> = Vec::new();
        let (segments, count) = self.segments();
        let mut left = n;
        for s in &segments[..count] {
            if left == 0 {
                break;
            }
            let c = usize::from(s.class);
            let mut it = self.classes[c].iter();
            for _ in 0..s.skip {
                it.next_position();
            }
            let mut taken = 0u32;
            while left > 0 && taken < s.take {
                let Some((k, i, _)) = it.next_position() else {
                    break;
                };
                if pred(&self.classes[c].tenants[k].items[i]) {
                    found.push((c, k, i));
                }
                left -= 1;
                taken += 1;
            }
        }
        // Removed from the back of each tenant's queue first, so indices hold.
        found.sort_unstable_by(|a, b| b.cmp(a));
        let mut out = Vec::with_capacity(found.len());
        for (c, k, i) in found {
            let class = &mut self.classes[c];
            if let Some(item) = class.tenants[k].items.remove(i) {
                class.len -= 1;
                self.len -= 1;
                out.push(item);
            }
            class.restart_if_empty();
        }
        out
    }

    /// Passes every record through `keep`, which gives back those that stay.
    pub(crate) fn retain_with(&mut self, mut keep: impl FnMut(T) -> Option<T>) {
        let mut len = 0;
        for class in &mut self.classes {
            class.len = 0;
            for tenant in &mut class.tenants {
                let items = std::mem::take(&mut tenant.items);
                tenant.items = items.into_iter().filter_map(&mut keep).collect();
                class.len += tenant.items.len();
            }
            class.restart_if_empty();
            len += class.len;
        }
        self.len = len;
    }

    /// How many records a new record of `lane` due at `deadline` would wait behind,
    /// for shedding: every record of a more urgent class, its own tenant's records
    /// due no later than it, and from each
    /// other tenant of its class with records queued, as many as that tenant's
    /// weight gives it up to the new record's tag — counted as if that tenant kept
    /// sending (a flood does: its later records go ahead of this one by their
    /// tags). That overcounts a tenant whose short queue is all it sends, which
    /// only sheds at a shorter queue: enough stays queued to fill every call.
    pub(crate) fn ahead(&self, lane: &Lane, deadline: Option<Instant>) -> usize {
        let c = usize::from(lane.class.0);
        let above: usize = self.classes[..c].iter().map(|q| q.len).sum();
        let class = &self.classes[c];
        let v = class.vtime;
        let weight = if lane.weight.is_finite() {
            lane.weight.clamp(1e-3, 1e6)
        } else {
            1.0
        };
        let own = class.find(&lane.tenant);
        // Where it would go in its tenant's queue: after the records due no later.
        let position = own.map_or(0, |k| {
            let items = &class.tenants[k].items;
            if items
                .back()
                .is_none_or(|x| no_later(x.deadline(), deadline))
            {
                items.len()
            } else {
                items.partition_point(|x| no_later(x.deadline(), deadline))
            }
        });
        let tag = match own {
            Some(k) => {
                let t = &class.tenants[k];
                t.finish.max(v) + (position + 1) as f64 / weight
            }
            None => v + 1.0 / weight,
        };
        let same: usize = class
            .tenants
            .iter()
            .enumerate()
            .map(|(k, t)| {
                if Some(k) == own {
                    position
                } else if t.items.is_empty() {
                    0
                } else {
                    let start = t.finish.max(v);
                    ((tag - start) * t.weight).floor().max(0.0) as usize
                }
            })
            .sum();
        above + same
    }
}

/// The queued records in sending order ([`Schedule::iter`]).
pub(crate) struct Iter<'a, T> {
    schedule: &'a Schedule<T>,
    segments: [Segment; SEGMENTS],
    n: usize,
    at: usize,
    current: Option<(ClassIter<'a, T>, u32)>,
}

impl<T> Clone for Iter<'_, T> {
    fn clone(&self) -> Self {
        Iter {
            schedule: self.schedule,
            segments: self.segments,
            n: self.n,
            at: self.at,
            current: self.current.clone(),
        }
    }
}

impl<'a, T> Iterator for Iter<'a, T> {
    type Item = &'a T;
    fn next(&mut self) -> Option<&'a T> {
        loop {
            if let Some((it, left)) = &mut self.current {
                if *left > 0 {
                    if let Some(item) = it.next() {
                        *left -= 1;
                        return Some(item);
                    }
                }
                self.current = None;
            }
            if self.at == self.n {
                return None;
            }
            let s = self.segments[self.at];
            self.at += 1;
            let mut it = self.schedule.classes[usize::from(s.class)].iter();
            for _ in 0..s.skip {
                it.next_position();
            }
            self.current = Some((it, s.take));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct R {
        id: u32,
        lane: Lane,
        due: Option<Instant>,
    }

    impl Scheduled for R {
        fn lane(&self) -> &Lane {
            &self.lane
        }
        fn deadline(&self) -> Option<Instant> {
            self.due
        }
    }

    fn r(id: u32, lane: &Lane) -> R {
        R {
            id,
            lane: lane.clone(),
            due: None,
        }
    }

    fn ids<'a>(it: impl Iterator<Item = &'a R>) -> Vec<u32> {
        it.map(|r| r.id).collect()
    }

    fn schedule(min_share: f64) -> Schedule<R> {
        Schedule::new(&SchedulingConfig { min_share }, 32)
    }

    #[test]
    fn class_names_and_levels() {
        assert_eq!(Class::parse("interactive"), Some(Class::INTERACTIVE));
        assert_eq!(Class::parse("bulk"), Some(Class::BULK));
        assert_eq!(Class::parse("7"), Some(Class::LOWEST));
        assert_eq!(Class::parse("8"), None);
        assert_eq!(Class::parse("urgent"), None);
        assert_eq!(Class::BULK.name(), "bulk");
        assert_eq!(Class::level(5).unwrap().name(), "5");
    }

    #[test]
    fn one_lane_is_fifo_and_nearer_deadlines_go_first() {
        let now = Instant::now();
        let mut s = schedule(0.1);
        let lane = Lane::default();
        for id in 0..4 {
            s.push(r(id, &lane));
        }
        assert_eq!(ids(s.iter()), [0, 1, 2, 3]);
        let mut s = schedule(0.1);
        for (id, ms) in [(0, 50), (1, 10), (2, 30), (3, 30)] {
            s.push(R {
                id,
                lane: lane.clone(),
                due: Some(now + Duration::from_millis(ms)),
            });
        }
        s.push(r(4, &lane)); // no deadline: last
        s.push_first(R {
            id: 5,
            lane: lane.clone(),
            due: Some(now + Duration::from_millis(30)),
        });
        assert_eq!(ids(s.iter()), [1, 5, 2, 3, 0, 4]);
        // A new record due in 20 ms would wait behind 1 (10 ms) only.
        assert_eq!(s.ahead(&lane, Some(now + Duration::from_millis(20))), 1);
        assert_eq!(s.ahead(&lane, None), 6);
        assert_eq!(ids(s.take(2).iter()), [1, 5]);
        assert_eq!(s.pop_front().map(|r| r.id), Some(2));
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn urgent_classes_go_first_and_a_short_call_is_topped_up_from_the_next() {
        let mut s = schedule(0.0);
        let (bulk, urgent) = (Lane::class(Class::BULK), Lane::class(Class::INTERACTIVE));
        for id in 0..10 {
            s.push(r(id, &bulk));
        }
        s.push(r(100, &urgent));
        s.push(r(101, &urgent));
        assert_eq!(ids(s.iter().take(4)), [100, 101, 0, 1]);
        assert_eq!(ids(s.take(4).iter()), [100, 101, 0, 1]);
        assert_eq!(ids(s.iter()), [2, 3, 4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn a_waiting_class_gets_its_minimum_share_of_every_call() {
        let mut s = schedule(0.1);
        let (bulk, urgent) = (Lane::class(Class::BULK), Lane::class(Class::INTERACTIVE));
        let mut id = 0;
        for _ in 0..5_000 {
            s.push(r(id, &bulk));
            id += 1;
        }
        let (mut sent_bulk, mut sent) = (0, 0);
        for _ in 0..100 {
            // The urgent class alone could fill every call.
            while s.classes[0].len < 64 {
                s.push(r(id, &urgent));
                id += 1;
            }
            let call = s.take(32);
            sent += call.len();
            sent_bulk += call.iter().filter(|r| r.lane.class == Class::BULK).count();
        }
        let share = sent_bulk as f64 / sent as f64;
        assert!((0.095..=0.105).contains(&share), "bulk got {share}");
        // Without a share it would get nothing.
        let mut s = schedule(0.0);
        for i in 0..100 {
            s.push(r(i, &bulk));
        }
        for i in 0..64 {
            s.push(r(1000 + i, &urgent));
        }
        assert!(s
            .take(32)
            .iter()
            .all(|r| r.lane.class == Class::INTERACTIVE));
    }

    #[test]
    fn tenants_of_a_class_share_by_weight_and_a_flood_delays_only_its_own() {
        let mut s = schedule(0.1);
        let (a, b) = (
            Lane::tenant(Class::DEFAULT, "a", 1.0),
            Lane::tenant(Class::DEFAULT, "b", 1.0),
        );
        for i in 0..1000 {
            s.push(r(i, &a));
        }
        // b's one record is among the first two, not behind a's thousand.
        s.push(r(5000, &b));
        assert!(ids(s.iter().take(2)).contains(&5000));
        // b's next record: behind a's first two and b's own (tags 1, 2 and 1).
        assert_eq!(s.ahead(&b, None), 3);
        // a's next: its own thousand, and as many of b's as b would send meanwhile.
        assert_eq!(s.ahead(&a, None), 2001);
        // Both backlogged, weights 2 : 1 — two thirds and one third.
        let mut s = schedule(0.1);
        let heavy = Lane::tenant(Class::DEFAULT, "heavy", 2.0);
        let light = Lane::tenant(Class::DEFAULT, "light", 1.0);
        for i in 0..3000 {
            s.push(r(i, &heavy));
            s.push(r(10_000 + i, &light));
        }
        let mut got_heavy = 0;
        for _ in 0..30 {
            got_heavy += s.take(30).iter().filter(|r| r.lane == heavy).count();
        }
        assert_eq!(got_heavy, 600);
        // A tenant that was idle banks nothing: it starts at the class's time.
        let mut s = schedule(0.1);
        for i in 0..100 {
            s.push(r(i, &a));
        }
        let _ = s.take(50);
        s.push(r(7000, &b));
        s.push(r(7001, &b));
        assert_eq!(ids(s.iter().take(4)), [50, 7000, 51, 7001]);
    }

    #[test]
    fn retain_keeps_order_and_counts() {
        let mut s = schedule(0.1);
        let (a, bulk) = (Lane::default(), Lane::class(Class::BULK));
        for i in 0..10 {
            s.push(r(i, if i % 2 == 0 { &a } else { &bulk }));
        }
        s.retain_with(|x| (x.id % 3 != 0).then_some(x));
        assert_eq!(s.len(), 6);
        assert_eq!(ids(s.iter()), [2, 4, 8, 1, 5, 7]);
        s.retain_with(|_| None);
        assert!(s.is_empty());
        assert_eq!(s.iter().count(), 0);
    }
}
