//! The dispatcher: one task per engine that owns the queue, the delayed retries and
//! the bisection groups, and turns the policies' answers into calls (sending one:
//! `send.rs`; failing records before they are sent: `unsent.rs`).

mod send;
mod unsent;

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flumen_core::{Backend, BackendError, ErrorKind, Failure};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant, Sleep};

use super::call::Report;
use super::{with_last_error, EngineConfig, Job};
use crate::batcher::{BatchPolicy, Decision, Slots};
use crate::limiter::Limiter;
use crate::limiter::SampleOutcome;
use crate::reliability::pause::Pause;
use crate::reliability::{Breaker, BreakerState, RetryBudget, RetryConfig, Verdict};
use crate::schedule::Schedule;
use crate::spend::SpendConfig;
use crate::stats::Stats;
use crate::telemetry::Instruments;
use crate::LatencyModel;

pub(super) struct Dispatcher<B: Backend> {
    backend: Arc<B>,
    rx: mpsc::UnboundedReceiver<Job<B>>,
    /// Records ready to send, in sending order (classes, tenants, deadlines).
    queue: Schedule<Job<B>>,
    /// Records waiting out a backoff, by when they may go again.
    delayed: BTreeMap<(Instant, u64), Job<B>>,
    /// Halves of batches that failed as a whole, each sent alone to find the record
    /// that poisoned them.
    isolated: VecDeque<Vec<Job<B>>>,
    seq: u64,
    policy: BatchPolicy,
    limiter: Limiter,
    breaker: Option<Breaker>,
    budget: Arc<Mutex<RetryBudget>>,
    rng: ChaCha8Rng,
    latency: LatencyModel,
    calls: JoinSet<Report<B>>,
    in_flight: usize,
    /// Records in the calls in flight.
    in_flight_items: usize,
    /// When a call last finished.
    freed_at: Option<Instant>,
    next_expiry: Option<Instant>,
    /// No call is sent while paused (after overload, or a run of failed calls).
    pause: Pause,
    stats: Arc<Stats>,
    instruments: Arc<Instruments>,
    attempt_timeout: Option<Duration>,
    hedge_after: Option<Duration>,
    retry: RetryConfig,
    spend: Option<SpendConfig>,
    prices: Option<crate::spend::Prices>,
    /// The engine's name, on its `call` spans.
    name: Arc<str>,
    /// With `on_exhausted = wait`: no call is sent until then (the budget's next
    /// period), or until a call in flight settles for less than it reserved.
    spend_wait: Option<Instant>,
    /// The upstream's rate limits, and until when they let no call through.
    rate: Option<Arc<dyn crate::rate::RateGate>>,
    rate_wait: Option<Instant>,
    /// See [`EngineConfig::hand_off`].
    hand_off: bool,
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl<B: Backend> Dispatcher<B> {
    pub(super) fn new(
        backend: Arc<B>,
        config: &EngineConfig,
        rx: mpsc::UnboundedReceiver<Job<B>>,
        stats: Arc<Stats>,
        instruments: Arc<Instruments>,
    ) -> Self {
        let caps = backend.capabilities();
        let policy = BatchPolicy::new(&config.batch, &caps);
        Dispatcher {
            backend,
            rx,
            queue: Schedule::new(&config.scheduling, policy.max_items()),
            delayed: BTreeMap::new(),
            isolated: VecDeque::new(),
            seq: 0,
            policy,
            limiter: Limiter::new(&config.concurrency),
            breaker: config.breaker.clone().map(Breaker::new),
            hand_off: config.hand_off,
            budget: Arc::new(Mutex::new(RetryBudget::new(&config.retry))),
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            latency: LatencyModel::default(),
            calls: JoinSet::new(),
            in_flight: 0,
            in_flight_items: 0,
            freed_at: None,
            next_expiry: None,
            pause: Pause::default(),
            stats,
            instruments,
            attempt_timeout: config.attempt_timeout,
            hedge_after: config
                .hedge_after
                .filter(|_| caps.idempotent && config.spend.is_none() && config.rate.is_none()),
            retry: config.retry.clone(),
            spend: config.spend.clone(),
            prices: config.prices,
            name: Arc::from(config.name.as_str()),
            spend_wait: None,
            rate: config.rate.clone(),
            rate_wait: None,
        }
    }

    pub(super) async fn run(mut self) {
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
        let mut timer: Pin<Box<Sleep>> = Box::pin(sleep_until(far()));
        let mut armed: Option<Instant> = None;
        let mut open = true;
        loop {
            while open {
                match self.rx.try_recv() {
                    Ok(job) => self.enqueue(job),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            let now = Instant::now();
            self.release_due(now);
            self.expire(now);
            let wake = self.dispatch(now);
            self.publish(now);
            let idle = self.queue.is_empty() && self.delayed.is_empty() && self.isolated.is_empty();
            if !open && idle && self.calls.is_empty() {
                return;
            }

            let wake = earliest(wake, self.next_expiry);
            let wake = earliest(wake, self.delayed.keys().next().map(|k| k.0));
            if wake != armed {
                timer.as_mut().reset(wake.unwrap_or_else(far));
                armed = wake;
            }
            tokio::select! {
                biased;
                Some(done) = self.calls.join_next(), if !self.calls.is_empty() => {
                    self.in_flight -= 1;
                    self.freed_at = Some(Instant::now());
                    // A call task never panics: backend panics are caught inside it.
                    // (Were it to, its budget reservation would stay reserved; the
                    // records waiting for the budget look again all the same.)
                    self.spend_wait = None;
                    if let Ok(report) = done {
                        self.in_flight_items -= report.sample.items;
                        self.on_report(report);
                    }
                }
                job = self.rx.recv(), if open => match job {
                    Some(job) => self.enqueue(job),
                    None => open = false,
                },
                () = timer.as_mut(), if armed.is_some() => {
                    armed = None;
                    timer.as_mut().reset(far());
                }
            }
        }
    }

    fn note_deadline(&mut self, deadline: Option<Instant>) {
        self.next_expiry = earliest(self.next_expiry, deadline);
    }

    fn enqueue(&mut self, job: Job<B>) {
        if let Some(deadline) = job.meta.deadline {
            let now = Instant::now();
            // The records it would wait behind: more urgent classes, and its own
            // class's records due before it by the tenants' fair shares (fewer than
            // a full call queued in all: no backlog to shed for).
            let queued = if self.queue.len() < self.policy.max_items() {
                self.queue.len()
            } else {
                self.queue.ahead(&job.lane, job.meta.deadline)
            };
            let limit = self.limiter.limit();
            if let Some(answer) = self
                .policy
                .sheds(now, deadline, queued, limit, &self.latency)
            {
                self.shed(job, now, answer, deadline);
                return;
            }
        }
        self.note_deadline(job.meta.deadline);
        self.queue.push(job);
    }

    /// Moves retries whose backoff is over to the front of the queue (they are the
    /// oldest records), keeping their order, as far as the retry budget pays for
    /// them. The rest wait for the budget to refill, within their deadlines: a retry
    /// is never sent unpaid, and never turned into a failure while time remains.
    fn release_due(&mut self, now: Instant) {
        let mut due = Vec::new();
        let mut budget = self.budget.lock().expect("budget lock");
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            if entry.get().reply.is_closed() {
                entry.remove();
                continue;
            }
            if !budget.try_withdraw(now) {
                let at = budget
                    .next_token_at(now)
                    .max(now + Duration::from_millis(1));
                let mut job = entry.remove();
                if !job.starved {
                    job.starved = true;
                    self.instruments.budget_exhausted.increment(1);
                }
                self.seq += 1;
                self.delayed.insert((at, self.seq), job);
                break;
            }
            let job = entry.remove();
            if let Some(e) = &job.last_error {
                self.instruments.retry(e.kind);
            }
            due.push(job);
        }
        drop(budget);
        for job in due.into_iter().rev() {
            self.note_deadline(job.meta.deadline);
            self.queue.push_first(job);
        }
    }

    /// Fails waiting records whose deadline has passed, before they are sent again;
    /// forgets records whose submitter has gone away.
    fn expire(&mut self, now: Instant) {
        if self.next_expiry.is_none_or(|e| e > now) {
            return;
        }
        self.next_expiry = None;
        let breaker_open = matches!(
            self.breaker.as_mut().map(|b| b.state(now)),
            Some(BreakerState::Open { .. })
        );
        let keep = |job: Job<B>, next: &mut Option<Instant>| -> Option<Job<B>> {
            match job.meta.deadline {
                _ if job.reply.is_closed() => None,
                Some(d) if d <= now => {
                    let waited = now.duration_since(job.meta.enqueued).as_millis();
                    let why = if job.starved {
                        "waiting for the retry budget"
                    } else if breaker_open {
                        "while the circuit breaker was open"
                    } else {
                        "in the queue"
                    };
                    let message = with_last_error(
                        format!(
                            "deadline passed after {waited} ms, {why}, before the record could be sent"
                        ),
                        job.last_error.as_ref(),
                    );
                    let failure = Failure::new(ErrorKind::Timeout, message, job.attempts);
                    job.finish(&self.instruments, Err(failure));
                    None
                }
                deadline => {
                    *next = earliest(*next, deadline);
                    Some(job)
                }
            }
        };
        let mut next = None;
        self.queue.retain_with(|job| keep(job, &mut next));
        for group in std::mem::take(&mut self.isolated) {
            let kept: Vec<Job<B>> = group
                .into_iter()
                .filter_map(|job| keep(job, &mut next))
                .collect();
            if !kept.is_empty() {
                self.isolated.push_back(kept);
            }
        }
        for ((at, seq), job) in std::mem::take(&mut self.delayed) {
            if let Some(job) = keep(job, &mut next) {
                self.delayed.insert((at, seq), job);
            }
        }
        self.next_expiry = next;
    }

    /// Sends batches while the policy allows; returns when to look again.
    fn dispatch(&mut self, now: Instant) -> Option<Instant> {
        let paused = self.pause.until(now);
        loop {
            let spend_wait = self.spend_wait.filter(|t| *t > now);
            let rate_wait = self.rate_wait.filter(|t| *t > now);
            let breaker_allows = self.breaker.as_mut().is_none_or(|b| b.allows(now));
            if self.hand_off {
                let failing = paused.is_some() && self.pause.failing();
                if failing || !breaker_allows {
                    self.hand_off_waiting(if failing {
                        "the backend failed its last calls"
                    } else {
                        "the circuit breaker is open"
                    });
                }
            }
            let free_slots = if paused.is_none()
                && breaker_allows
                && spend_wait.is_none()
                && rate_wait.is_none()
            {
                self.limiter.limit().saturating_sub(self.in_flight)
            } else {
                0
            };
            if free_slots > 0 && self.launch_isolated(now) {
                continue;
            }
            self.fail_hopeless_in_first_call(now, self.in_flight);
            let metas = self.queue.iter().map(|j| &j.meta);
            let slots = Slots {
                free: free_slots,
                busy: self.in_flight,
                busy_items: self.in_flight_items,
                freed_at: self.freed_at,
            };
            match self.policy.decide(now, slots, metas, &self.latency) {
                Decision::Send(n) => {
                    if let Some(gate) = &self.rate {
                        let tokens = self.queue.iter().take(n).map(|j| j.billed).sum();
                        if let Err(at) = gate.acquire(tokens, now) {
                            // Nothing is sent until the upstream's limit allows.
                            self.rate_wait = Some(at.max(now + Duration::from_millis(1)));
                            continue;
                        }
                    }
                    let jobs: Vec<Job<B>> = self.queue.take(n);
                    self.launch(jobs, now, false);
                }
                Decision::RejectOversized => self.reject_head(),
                Decision::RejectHopeless { expected } => self.fail_hopeless_head(now, expected),
                Decision::Wait(at) => {
                    if self.queue.is_empty() && self.isolated.is_empty() {
                        return at;
                    }
                    let reopens = self.breaker.as_ref().and_then(Breaker::reopens_at);
                    let mut wake = earliest(earliest(at, paused), reopens);
                    wake = earliest(wake, spend_wait);
                    wake = earliest(wake, rate_wait);
                    if !self.isolated.is_empty() {
                        let budget = self.budget.lock().expect("budget lock").next_token_at(now);
                        wake = earliest(wake, Some(budget.max(now + Duration::from_millis(1))));
                    }
                    return wake;
                }
            }
        }
    }

    /// Sends the first bisection group, or as much of it as the retry budget pays
    /// for; false when there is none or the budget is empty.
    fn launch_isolated(&mut self, now: Instant) -> bool {
        let Some(group) = self.isolated.front_mut() else {
            return false;
        };
        let mut budget = self.budget.lock().expect("budget lock");
        let n = budget.affordable(now, group.len());
        if n == 0 {
            return false;
        }
        if let Some(gate) = &self.rate {
            let tokens = group.iter().take(n).map(|j| j.billed).sum();
            if let Err(at) = gate.acquire(tokens, now) {
                self.rate_wait = Some(at.max(now + Duration::from_millis(1)));
                return false;
            }
        }
        for _ in 0..n {
            budget.try_withdraw(now);
        }
        drop(budget);
        let rest = group.split_off(n);
        let paid = std::mem::replace(group, rest);
        if self.isolated.front().is_some_and(Vec::is_empty) {
            self.isolated.pop_front();
        }
        for job in &paid {
            if let Some(e) = &job.last_error {
                self.instruments.retry(e.kind);
            }
        }
        self.launch(paid, now, true);
        true
    }

    fn on_report(&mut self, report: Report<B>) {
        let now = Instant::now();
        // The call settled its reservation: what it did not spend may pay for the
        // records waiting for the budget.
        self.spend_wait = None;
        let (sample, judged) = (report.sample, report.judged);
        if sample.outcome == SampleOutcome::Ok {
            self.latency.observe(sample.items, sample.rtt);
        }
        let expected = self.latency.estimate(1);
        self.pause
            .on_call(now, &judged, expected, &self.retry, &mut self.rng);
        self.limiter.on_sample(now, &sample);
        if let Some(b) = self.breaker.as_mut() {
            b.on_result(now, judged.class, sample.rtt, report.probe);
            for (at, state) in b.take_transitions() {
                self.instruments.breaker_transition(state);
                self.stats.push_transition(at, state);
            }
        }
        for (mut job, error) in report.retry {
            // A probe tested the breaker, not the record.
            if report.probe && job.meta.deadline.is_some() {
                job.uncounted += 1;
            }
            self.retry(job, error, now);
        }
        if let Some((jobs, error)) = report.split {
            self.split(jobs, error);
        }
    }

    /// Schedules another attempt for a record after its backoff, or gives it its
    /// final failure, as [`RetryConfig::verdict`] decides. The retry budget is
    /// charged when the attempt is sent.
    fn retry(&mut self, mut job: Job<B>, error: BackendError, now: Instant) {
        if job.reply.is_closed() {
            return;
        }
        let deadline = job.meta.deadline;
        if !self.hand_off && RetryConfig::free_attempt(error.kind, deadline.is_some()) {
            job.uncounted += 1;
        }
        let verdict = self.retry.verdict(
            job.attempts,
            job.uncounted,
            &error,
            deadline,
            now,
            &mut self.rng,
        );
        match verdict {
            Verdict::Fail => {
                let failure = Failure::from_backend(error, job.attempts);
                job.finish(&self.instruments, Err(failure));
            }
            Verdict::TimeOut => {
                let message = with_last_error(
                    format!(
                        "deadline would pass before attempt {} could start",
                        job.attempts + 1
                    ),
                    Some(&error),
                );
                let failure = Failure::new(ErrorKind::Timeout, message, job.attempts);
                job.finish(&self.instruments, Err(failure));
            }
            Verdict::RetryAt(at) => {
                job.last_error = Some(error);
                self.note_deadline(deadline);
                self.seq += 1;
                self.delayed.insert((at, self.seq), job);
            }
        }
    }

    /// A batch failed as a whole with an error that is not worth retrying as is:
    /// perhaps one record poisoned it. Each half is sent again on its own (paid from
    /// the retry budget when sent), so the poison ends up alone; a record alone
    /// that still fails gets the error.
    fn split(&mut self, mut jobs: Vec<Job<B>>, error: BackendError) {
        jobs.retain(|j| !j.reply.is_closed());
        for job in &mut jobs {
            job.last_error = Some(error.clone());
        }
        let second = jobs.split_off(jobs.len() / 2);
        for half in [jobs, second] {
            if !half.is_empty() {
                let deadline = half.iter().filter_map(|j| j.meta.deadline).min();
                self.note_deadline(deadline);
                self.isolated.push_back(half);
            }
        }
    }

    fn publish(&mut self, now: Instant) {
        let limit = self.limiter.limit();
        let queued = self.queue.len()
            + self.delayed.len()
            + self.isolated.iter().map(Vec::len).sum::<usize>();
        let breaker = self
            .breaker
            .as_mut()
            .map_or(BreakerState::Closed, |b| b.state(now));
        self.stats
            .set_gauges(queued, self.in_flight, limit, breaker.phase());
        self.instruments
            .gauges(queued, self.in_flight, limit, breaker.level());
    }
}
