use super::*;

const A: LaneKey = [1; 32];
const B: LaneKey = [2; 32];
const C: LaneKey = [3; 32];

fn limits(concurrency: usize, per_lane: usize, rps: Option<u32>) -> Limits {
    Limits {
        concurrency,
        per_lane_concurrency: per_lane,
        per_lane_rps: rps,
    }
}

/// Dispatches and immediately finishes (answered) everything possible at
/// `now`, returning the lanes served in order.
fn serve_round(s: &mut Scheduler, now: Instant) -> Vec<LaneKey> {
    let mut out = Vec::new();
    while let Next::Dispatch(k) = s.next(now) {
        out.push(k);
    }
    for k in &out {
        s.finished(*k, now, Feedback::Answered(Hints::default()));
    }
    out
}

#[test]
fn lanes_are_served_round_robin() {
    let mut s = Scheduler::new(limits(64, 1, None));
    let now = Instant::now();
    s.queued(C);
    s.queued(B);
    s.queued(A);
    assert_eq!(serve_round(&mut s, now), [A, B, C]);
    assert_eq!(serve_round(&mut s, now), [A, B, C]);
    // A lane found empty leaves the ring.
    assert_eq!(s.next(now), Next::Dispatch(A));
    assert_eq!(s.next(now), Next::Dispatch(B));
    s.empty(B);
    assert_eq!(s.next(now), Next::Dispatch(C));
    assert_eq!(s.next(now), Next::Idle, "A and C are at their cap of 1");
    s.finished(A, now, Feedback::Answered(Hints::default()));
    s.finished(C, now, Feedback::Answered(Hints::default()));
    assert_eq!(serve_round(&mut s, now), [A, C]);
    assert_eq!(s.in_flight(), 0);
}

#[test]
fn one_lanes_backlog_does_not_starve_a_new_lane() {
    let mut s = Scheduler::new(limits(4, 4, None));
    let now = Instant::now();
    s.queued(A);
    for _ in 0..4 {
        assert_eq!(s.next(now), Next::Dispatch(A));
    }
    assert_eq!(s.next(now), Next::Idle, "global concurrency reached");
    s.queued(B);
    s.finished(A, now, Feedback::Answered(Hints::default()));
    // The freed slot goes to B, waiting behind A's backlog.
    assert_eq!(s.next(now), Next::Dispatch(B));
}

#[test]
fn per_lane_concurrency_is_a_cap() {
    let mut s = Scheduler::new(limits(64, 2, None));
    let now = Instant::now();
    s.queued(A);
    assert_eq!(s.next(now), Next::Dispatch(A));
    assert_eq!(s.next(now), Next::Dispatch(A));
    assert_eq!(s.next(now), Next::Idle);
    assert_eq!(s.in_flight(), 2);
}

#[test]
fn sliding_window_paces_at_n_per_window() {
    let mut s = Scheduler::new(limits(64, 64, Some(3)));
    let t0 = Instant::now();
    s.queued(A);
    let mut sends = Vec::new();
    let mut now = t0;
    while sends.len() < 9 {
        match s.next(now) {
            Next::Dispatch(k) => {
                sends.push(now - t0);
                s.finished(k, now, Feedback::Answered(Hints::default()));
            }
            Next::At(t) => now = t,
            Next::Idle => panic!("a queued lane is never idle here"),
        }
    }
    let w = WINDOW;
    assert_eq!(
        sends,
        [
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            w,
            w,
            w,
            w * 2,
            w * 2,
            w * 2
        ]
    );
}

#[test]
fn learned_limit_combines_with_the_flag_by_the_smaller() {
    let mut s = Scheduler::new(limits(64, 64, Some(5)));
    let now = Instant::now();
    s.queued(A);
    assert_eq!(s.next(now), Next::Dispatch(A));
    let hints = Hints {
        rps_limit: Some(2),
        ..Hints::default()
    };
    s.finished(A, now, Feedback::Answered(hints));
    assert_eq!(s.next(now), Next::Dispatch(A));
    assert_eq!(s.next(now), Next::At(now + WINDOW));
}

#[test]
fn refusals_pause_the_lane_with_retry_after_or_doubling_to_60s() {
    let mut s = Scheduler::new(limits(64, 1, None));
    let mut now = Instant::now();
    s.queued(B);
    s.queued(A);
    assert_eq!(s.next(now), Next::Dispatch(A));
    let refused = Feedback::Refused {
        retry_after: Some(Duration::from_secs(7)),
        hints: Hints::default(),
    };
    s.finished(A, now, refused);
    // B is unaffected by A's pause.
    assert_eq!(s.next(now), Next::Dispatch(B));
    s.empty(B);
    assert_eq!(s.next(now), Next::At(now + Duration::from_secs(7)));

    let mut waits = Vec::new();
    for _ in 0..8 {
        now = match s.next(now) {
            Next::At(t) => t,
            _ => now,
        };
        assert_eq!(s.next(now), Next::Dispatch(A));
        s.finished(
            A,
            now,
            Feedback::Refused {
                retry_after: None,
                hints: Hints::default(),
            },
        );
        let Next::At(t) = s.next(now) else {
            panic!("paused")
        };
        waits.push((t - now).as_secs());
    }
    // 7 s came from Retry-After; the next refusals double from there on.
    assert_eq!(waits, [2, 4, 8, 16, 32, 60, 60, 60]);
    // An answer resets the backoff.
    now += Duration::from_secs(60);
    assert_eq!(s.next(now), Next::Dispatch(A));
    s.finished(A, now, Feedback::Answered(Hints::default()));
    assert_eq!(s.next(now), Next::Dispatch(A));
    s.finished(
        A,
        now,
        Feedback::Refused {
            retry_after: None,
            hints: Hints::default(),
        },
    );
    assert_eq!(s.next(now), Next::At(now + Duration::from_secs(1)));
}

#[test]
fn refusals_never_run_out() {
    let mut s = Scheduler::new(limits(64, 1, None));
    let mut now = Instant::now();
    s.queued(A);
    for _ in 0..10_000 {
        match s.next(now) {
            Next::Dispatch(k) => s.finished(
                k,
                now,
                Feedback::Refused {
                    retry_after: None,
                    hints: Hints::default(),
                },
            ),
            Next::At(t) => now = t,
            Next::Idle => panic!("a refused request must stay queued"),
        }
    }
}

#[test]
fn outages_back_off_doubling_to_30s() {
    let mut s = Scheduler::new(limits(64, 1, None));
    let mut now = Instant::now();
    s.queued(A);
    let mut waits = Vec::new();
    for _ in 0..7 {
        assert_eq!(s.next(now), Next::Dispatch(A));
        s.finished(A, now, Feedback::NotSent);
        let Next::At(t) = s.next(now) else {
            panic!("paused")
        };
        waits.push((t - now).as_secs());
        now = t;
    }
    assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
}

#[test]
fn rps_remaining_zero_pauses_a_second() {
    let mut s = Scheduler::new(limits(64, 4, None));
    let now = Instant::now();
    s.queued(A);
    assert_eq!(s.next(now), Next::Dispatch(A));
    let hints = Hints {
        second_exhausted: true,
        ..Hints::default()
    };
    s.finished(A, now, Feedback::Answered(hints));
    assert_eq!(s.next(now), Next::At(now + Duration::from_secs(1)));
}

#[test]
fn exhausted_quota_sends_one_probe_a_minute_until_one_gets_through() {
    let mut s = Scheduler::new(limits(64, 4, None));
    let mut now = Instant::now();
    s.queued(A);
    assert_eq!(s.next(now), Next::Dispatch(A));
    let out = Hints {
        quota_exhausted: true,
        ..Hints::default()
    };
    s.finished(A, now, Feedback::Answered(out));
    assert_eq!(s.next(now), Next::At(now + PROBE_EVERY));
    now += PROBE_EVERY;
    // One probe at a time.
    assert_eq!(s.next(now), Next::Dispatch(A));
    assert_eq!(s.next(now), Next::Idle);
    s.finished(
        A,
        now,
        Feedback::Refused {
            retry_after: None,
            hints: out,
        },
    );
    assert_eq!(s.next(now), Next::At(now + PROBE_EVERY));
    now += PROBE_EVERY;
    assert_eq!(s.next(now), Next::Dispatch(A));
    s.finished(A, now, Feedback::Answered(Hints::default()));
    // Through: full concurrency again.
    for _ in 0..4 {
        assert_eq!(s.next(now), Next::Dispatch(A));
    }
}

#[test]
fn a_lost_attempt_that_is_not_requeued_does_not_pause() {
    let mut s = Scheduler::new(limits(64, 1, None));
    let now = Instant::now();
    s.queued(A);
    assert_eq!(s.next(now), Next::Dispatch(A));
    s.finished(A, now, Feedback::FailedAfterSend { requeued: false });
    assert_eq!(s.next(now), Next::Dispatch(A));
}

#[test]
fn sends_before_a_limit_is_learned_count_against_it() {
    let mut s = Scheduler::new(limits(64, 4, None));
    let now = Instant::now();
    s.queued(A);
    for _ in 0..4 {
        assert_eq!(s.next(now), Next::Dispatch(A));
    }
    let hints = Hints {
        rps_limit: Some(5),
        ..Hints::default()
    };
    for _ in 0..4 {
        s.finished(A, now, Feedback::Answered(hints));
    }
    assert_eq!(s.next(now), Next::Dispatch(A), "the 5th of this window");
    assert_eq!(s.next(now), Next::At(now + WINDOW));
}

#[test]
fn attempts_failing_together_step_the_backoff_once() {
    let mut s = Scheduler::new(limits(64, 4, None));
    let now = Instant::now();
    s.queued(A);
    for _ in 0..4 {
        assert_eq!(s.next(now), Next::Dispatch(A));
    }
    for _ in 0..4 {
        s.finished(A, now, Feedback::NotSent);
    }
    assert_eq!(s.next(now), Next::At(now + Duration::from_secs(1)));
    let later = now + Duration::from_secs(1);
    for _ in 0..4 {
        assert_eq!(s.next(later), Next::Dispatch(A));
    }
    for _ in 0..4 {
        s.finished(
            A,
            later,
            Feedback::Refused {
                retry_after: None,
                hints: Hints::default(),
            },
        );
    }
    assert_eq!(s.next(later), Next::At(later + Duration::from_secs(1)));
}

#[test]
fn pauses_are_clamped_to_one_second_and_one_day() {
    let mut s = Scheduler::new(limits(8, 1, None));
    let now = Instant::now();
    s.queued(A);
    s.queued(B);
    assert_eq!(s.next(now), Next::Dispatch(B));
    assert_eq!(s.next(now), Next::Dispatch(A));
    // Whatever reaches the scheduler, no overflow and no hot loop.
    s.finished(
        A,
        now,
        Feedback::Refused {
            retry_after: Some(Duration::from_secs(u64::MAX)),
            hints: Hints::default(),
        },
    );
    s.finished(
        B,
        now,
        Feedback::Refused {
            retry_after: Some(Duration::ZERO),
            hints: Hints::default(),
        },
    );
    assert_eq!(s.next(now), Next::At(now + MIN_PAUSE), "B waits a second");
    assert_eq!(s.next(now + MIN_PAUSE), Next::Dispatch(B));
    assert_eq!(
        s.next(now + MIN_PAUSE),
        Next::At(now + MAX_PAUSE),
        "A waits a day, not forever"
    );
}

#[test]
fn idle_lanes_are_forgotten_once_their_window_and_pause_are_over() {
    let mut s = Scheduler::new(limits(64, 4, Some(10)));
    let now = Instant::now();
    for i in 0..1000u32 {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_be_bytes());
        s.queued(k);
    }
    let mut sent = Vec::new();
    while let Next::Dispatch(k) = s.next(now) {
        sent.push(k);
        s.finished(k, now, Feedback::Answered(Hints::default()));
    }
    for k in &sent {
        s.empty(*k); // the claim found nothing more
    }
    // All dispatched (one each), each lane now idle with a send in its window.
    assert_eq!(s.lanes(), 1000);
    let _ = s.next(now);
    assert_eq!(s.lanes(), 1000, "their sends are still inside the window");
    // A paused lane stays until its pause is over.
    let paused = sent[0];
    s.queued(paused);
    assert_eq!(s.next(now + WINDOW), Next::Dispatch(paused));
    s.empty(paused);
    s.queued(paused);
    assert_eq!(s.next(now + WINDOW), Next::Dispatch(paused));
    s.finished(
        paused,
        now + WINDOW,
        Feedback::Refused {
            retry_after: Some(Duration::from_secs(5)),
            hints: Hints::default(),
        },
    );
    s.empty(paused);
    let later = now + WINDOW * 2;
    assert_eq!(s.next(later), Next::Idle);
    assert_eq!(s.lanes(), 1, "only the paused lane is left");
    let pause_ends = now + WINDOW + Duration::from_secs(5);
    assert_eq!(s.housekeeping_at(), Some(pause_ends));
    assert_eq!(s.next(pause_ends), Next::Idle);
    assert_eq!(s.lanes(), 0);
    assert_eq!(s.housekeeping_at(), None);
}

#[test]
fn a_drained_lane_is_forgotten_as_the_dispatcher_drives_it() {
    let mut s = Scheduler::new(limits(64, 4, None));
    let now = Instant::now();
    s.queued(A);
    s.queued(B);
    // One request each: dispatched, answered, then a claim finds nothing.
    let mut running = Vec::new();
    while let Next::Dispatch(k) = s.next(now) {
        running.push(k);
    }
    assert_eq!(running.len(), 8, "4 slots each, the claims decide");
    let (got, empty) = running.split_at(2);
    for k in empty {
        s.empty(*k);
    }
    for k in got {
        s.finished(*k, now, Feedback::Answered(Hints::default()));
    }
    assert_eq!(s.next(now), Next::Idle);
    assert_eq!(s.housekeeping_at(), Some(now + WINDOW));
    assert_eq!(s.next(now + WINDOW), Next::Idle);
    assert_eq!(s.lanes(), 0);
}

#[test]
fn a_lane_whose_sends_left_the_window_before_it_drained_is_forgotten() {
    let mut s = Scheduler::new(limits(64, 4, None));
    let now = Instant::now();
    s.queued(A);
    assert_eq!(s.next(now), Next::Dispatch(A));
    s.finished(A, now, Feedback::Answered(Hints::default()));
    // The next look comes after the window: the send is forgotten, and
    // the claim finds the lane empty.
    let later = now + WINDOW * 3;
    assert_eq!(s.next(later), Next::Dispatch(A));
    s.empty(A);
    assert_eq!(s.next(later), Next::Idle);
    assert_eq!(s.next(later), Next::Idle);
    assert_eq!(s.lanes(), 0);
}

#[test]
fn a_lane_whose_claim_took_its_last_request_needs_no_empty_claim() {
    let mut s = Scheduler::new(limits(64, 1, None));
    let now = Instant::now();
    s.queued(A);
    s.queued(B);
    assert_eq!(s.next(now), Next::Dispatch(B));
    assert_eq!(s.next(now), Next::Dispatch(A));
    // A's claim said it took A's last request; B's said B holds more.
    s.drained(A);
    s.finished(A, now, Feedback::Answered(Hints::default()));
    s.finished(B, now, Feedback::Answered(Hints::default()));
    // A is never dispatched again, and goes once its send leaves the window.
    assert_eq!(s.next(now), Next::Dispatch(B));
    s.empty(B);
    assert_eq!(s.next(now + WINDOW), Next::Idle);
    assert_eq!(s.next(now + WINDOW), Next::Idle);
    assert_eq!(s.lanes(), 0);
    // A submission after the claim brings it back.
    s.queued(A);
    s.drained(A);
    s.queued(A);
    assert_eq!(s.next(now + WINDOW), Next::Dispatch(A));
}
