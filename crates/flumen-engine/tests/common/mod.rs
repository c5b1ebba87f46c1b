//! Helpers shared by the engine's integration tests.

use std::time::Duration;

use flumen_engine::Outcome;

/// Milliseconds.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Every id in `0..n` has exactly one outcome, and there are no others.
pub fn assert_exactly_once<O>(outcomes: &[Outcome<u64, O>], n: u64) {
    let mut seen = vec![0u32; n as usize];
    for o in outcomes {
        seen[o.record as usize] += 1;
    }
    let wrong: Vec<_> = seen.iter().enumerate().filter(|(_, c)| **c != 1).collect();
    assert!(
        wrong.is_empty(),
        "ids without exactly one outcome: {wrong:?}"
    );
    assert_eq!(outcomes.len() as u64, n);
}
