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
