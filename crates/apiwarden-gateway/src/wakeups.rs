//! A worker's own wake-ups: the upstream response deadlines of its requests and the stop
//! signal of its connections, kept in a list of the worker thread's own.
//!
//! Each worker serves its connections on a single-threaded runtime, so a request's futures
//! never leave the worker's thread. tokio's timer would register and remove an entry in its
//! wheel for every request, and a `watch` channel would take its lock on every poll of every
//! connection; here a request takes a slot in a vector and gives it back, and a poll reads a
//! flag. A worker's [`run`] task looks for passed deadlines every [`TICK`] while any is
//! waiting, and sleeps otherwise: a deadline fires at most one tick late, never early.
//!
//! Off a worker thread (where [`run`] has not installed the list) the same futures fall back
//! to tokio's timer and to the gateway's stop channel.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often a worker looks for passed deadlines while any is waiting: the most a deadline
/// can fire late.
pub const TICK: Duration = Duration::from_millis(50);

thread_local! {
    static LIST: RefCell<Option<List>> = const { RefCell::new(None) };
}

/// What one waiting future left in the list.
struct Slot {
    /// The deadline; `None` for a wait for the stop signal.
    at: Option<Instant>,
    waker: Waker,
    fired: bool,
}

#[derive(Default)]
struct List {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Deadlines waiting (not yet fired).
    waiting: usize,
    stopped: bool,
    /// The [`run`] task, while it sleeps for want of deadlines.
    ticker: Option<Waker>,
}

impl List {
    fn insert(&mut self, slot: Slot) -> usize {
        if slot.at.is_some() {
            self.waiting += 1;
            if let Some(t) = self.ticker.take() {
                t.wake();
            }
        }
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) {
        if let Some(s) = self.slots[i].take() {
            if s.at.is_some() && !s.fired {
                self.waiting -= 1;
            }
            self.free.push(i);
        }
    }

    /// Whether slot `i` has fired; if not, it will wake `cx`'s task when it does.
    fn poll(&mut self, i: usize, cx: &Context<'_>) -> bool {
        match &mut self.slots[i] {
            Some(s) if s.fired => true,
            Some(s) => {
                if !s.waker.will_wake(cx.waker()) {
                    s.waker = cx.waker().clone();
                }
                false
            }
            None => true,
        }
    }

    fn fire_due(&mut self, now: Instant) {
        for s in self.slots.iter_mut().flatten() {
            if !s.fired && s.at.is_some_and(|at| at <= now) {
                s.fired = true;
                self.waiting -= 1;
                s.waker.wake_by_ref();
            }
        }
    }

    fn stop(&mut self) {
        self.stopped = true;
        for s in self.slots.iter_mut().flatten() {
            if !s.fired && s.at.is_none() {
                s.fired = true;
                s.waker.wake_by_ref();
            }
        }
    }
}

fn with<R>(f: impl FnOnce(&mut List) -> R) -> Option<R> {
    LIST.try_with(|l| l.borrow_mut().as_mut().map(f))
        .ok()
        .flatten()
}

fn installed() -> bool {
    LIST.try_with(|l| l.borrow().is_some()).unwrap_or(false)
}

/// A worker's wake-up task: installs the list on this thread and fires its deadlines. Runs
/// for the life of the worker's runtime.
pub async fn run() {
    LIST.with(|l| *l.borrow_mut() = Some(List::default()));
    loop {
        // Asleep until a deadline waits, then one tick.
        std::future::poll_fn(|cx| {
            with(|l| {
                if l.waiting > 0 {
                    Poll::Ready(())
                } else {
                    l.ticker = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .unwrap_or(Poll::Ready(()))
        })
        .await;
        tokio::time::sleep(TICK).await;
        with(|l| l.fire_due(Instant::now()));
    }
}

/// Wakes every connection of this worker that waits in [`stopped`]; later waits end at once.
pub fn stop() {
    with(List::stop);
}

/// A future that ends at `at` (at most [`TICK`] later on a worker thread).
pub fn deadline(at: Instant) -> Wait {
    if installed() {
        Wait::Slot {
            at: Some(at),
            slot: None,
        }
    } else {
        Wait::Other(Box::pin(tokio::time::sleep_until(at.into())))
    }
}

/// A future that ends when this worker is told to stop ([`stop`]); off a worker thread, when
/// `fallback` says so.
pub fn stopped(mut fallback: watch::Receiver<bool>) -> Wait {
    if installed() {
        Wait::Slot {
            at: None,
            slot: None,
        }
    } else {
        Wait::Other(Box::pin(async move {
            let _ = fallback.wait_for(|stop| *stop).await;
        }))
    }
}

/// A deadline or a wait for the stop signal; see [`deadline`] and [`stopped`].
pub enum Wait {
    Slot {
        at: Option<Instant>,
        slot: Option<usize>,
    },
    Other(Pin<Box<dyn Future<Output = ()> + Send>>),
}

impl Future for Wait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut() {
            Wait::Slot { at, slot } => {
                let done = with(|l| match *slot {
                    Some(i) => l.poll(i, cx),
                    None if at.is_none() && l.stopped => true,
                    None => {
                        *slot = Some(l.insert(Slot {
                            at: *at,
                            waker: cx.waker().clone(),
                            fired: false,
                        }));
                        false
                    }
                });
                // The list is gone only when the worker's runtime is: nothing to wait for.
                if done.unwrap_or(true) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }
            Wait::Other(f) => f.as_mut().poll(cx),
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Wait::Slot { slot: Some(i), .. } = *self {
            with(|l| l.remove(i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_deadline_fires_after_its_time_never_before_and_at_most_a_tick_late() {
        runtime().block_on(async {
            tokio::spawn(run());
            tokio::task::yield_now().await;
            for ms in [0u64, 30, 120, 260] {
                let start = Instant::now();
                let at = start + Duration::from_millis(ms);
                tokio::time::timeout(Duration::from_secs(5), deadline(at))
                    .await
                    .expect("a deadline never fired");
                let now = Instant::now();
                assert!(now >= at, "fired {:?} early", at - now);
                // A tick, and room for a loaded machine.
                assert!(
                    now - at < TICK + Duration::from_millis(500),
                    "fired {:?} late",
                    now - at
                );
            }
        });
    }

    #[test]
    fn a_dropped_deadline_gives_its_slot_back_and_is_not_counted() {
        runtime().block_on(async {
            tokio::spawn(run());
            tokio::task::yield_now().await;
            let far = Instant::now() + Duration::from_secs(3600);
            for _ in 0..3 {
                let r = tokio::time::timeout(Duration::from_millis(10), deadline(far)).await;
                assert!(r.is_err(), "a deadline an hour away fired");
            }
            let (slots, free, waiting) =
                with(|l| (l.slots.len(), l.free.len(), l.waiting)).unwrap();
            assert_eq!((slots, free, waiting), (1, 1, 0));
        });
    }

    #[test]
    fn stop_wakes_every_waiting_connection_and_ends_later_waits_at_once() {
        runtime().block_on(async {
            tokio::spawn(run());
            tokio::task::yield_now().await;
            let (_tx, rx) = watch::channel(false);
            let waits: Vec<_> = (0..3).map(|_| tokio::spawn(stopped(rx.clone()))).collect();
            tokio::task::yield_now().await;
            for w in &waits {
                assert!(!w.is_finished());
            }
            stop();
            for w in waits {
                tokio::time::timeout(Duration::from_secs(5), w)
                    .await
                    .expect("a connection was not told to stop")
                    .unwrap();
            }
            tokio::time::timeout(Duration::from_secs(5), stopped(rx))
                .await
                .expect("a wait begun after the stop did not end");
        });
    }

    #[test]
    fn off_a_worker_thread_the_futures_use_tokio_and_the_stop_channel() {
        runtime().block_on(async {
            let at = Instant::now() + Duration::from_millis(20);
            deadline(at).await;
            assert!(Instant::now() >= at);
            let (tx, rx) = watch::channel(false);
            let w = tokio::spawn(stopped(rx));
            tokio::task::yield_now().await;
            assert!(!w.is_finished());
            tx.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("the stop channel did not end the wait")
                .unwrap();
        });
    }
}
