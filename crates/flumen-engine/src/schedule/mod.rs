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

use std::collections::VecDeque;
use std::sync::Arc;

use class::{ClassIter, ClassQueue, TenantQueue};

use tokio::time::Instant;

mod class;

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
mod tests;
