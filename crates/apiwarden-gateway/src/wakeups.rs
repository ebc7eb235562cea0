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
//! The list never wakes a task while it is borrowed: the wakers are taken out first, so a
//! waker that runs code of its own cannot come back into a borrowed list. Off a worker thread
//! (where no list is installed) the same futures fall back to tokio's timer and to the
//! gateway's stop channel.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;
use tokio::sync::watch;

/// How often a worker looks for passed deadlines while any is waiting: the most a deadline
/// can fire late.
pub const TICK: Duration = Duration::from_millis(50);

thread_local! {
    static LIST: RefCell<Option<List>> = const { RefCell::new(None) };
}

/// Numbers the lists, so that a wait can tell its own list from another thread's.
static LISTS: AtomicU64 = AtomicU64::new(1);

/// What one waiting future left in the list.
struct Slot {
    /// The deadline; `None` in a wait for the stop signal.
    at: Option<Instant>,
    waker: Waker,
    fired: bool,
}

/// Whether slot `i` of `slots` has fired; if not, it will wake `cx`'s task when it does. The
/// waker it held before, if another, is returned to be dropped outside the list's borrow.
fn poll_registered(slots: &mut Slab<Slot>, i: usize, cx: &Context<'_>) -> (bool, Option<Waker>) {
    match slots.get_mut(i) {
        Some(s) if s.fired => (true, None),
        Some(s) if !s.waker.will_wake(cx.waker()) => (
            false,
            Some(std::mem::replace(&mut s.waker, cx.waker().clone())),
        ),
        Some(_) => (false, None),
        None => (true, None),
    }
}

struct List {
    id: u64,
    /// Upstream response deadlines.
    deadlines: Slab<Slot>,
    /// Deadlines not yet fired.
    waiting: usize,
    /// Connections waiting for the stop signal.
    stops: Slab<Slot>,
    stopped: bool,
    /// The [`run`] task, while it sleeps for want of deadlines.
    ticker: Option<Waker>,
}

impl List {
    fn new() -> List {
        List {
            id: LISTS.fetch_add(1, Relaxed),
            deadlines: Slab::new(),
            waiting: 0,
            stops: Slab::new(),
            stopped: false,
            ticker: None,
        }
    }
}

/// `f` on this thread's list, if it has one. Wakers are woken by the caller after this
/// returns, never inside: a waker's code may come back here.
fn with<R>(f: impl FnOnce(&mut List) -> R) -> Option<R> {
    LIST.try_with(|l| l.borrow_mut().as_mut().map(f))
        .ok()
        .flatten()
}

/// The id of this thread's list, if it has one.
fn list_id() -> Option<u64> {
    LIST.try_with(|l| l.borrow().as_ref().map(|l| l.id))
        .ok()
        .flatten()
}

/// Gives this thread its wake-up list (once; later calls keep the list there). A worker
/// calls it before it takes its first connection, so that [`stop`] always finds it; the
/// deadlines fire once [`run`] runs too.
pub fn install() {
    LIST.with(|l| {
        l.borrow_mut().get_or_insert_with(List::new);
    });
}

/// A worker's wake-up task: fires the deadlines of this thread's list (installing it if
/// [`install`] has not). Runs for the life of the worker's runtime.
pub async fn run() {
    install();
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
        let now = Instant::now();
        let due = with(|l| {
            let mut due = Vec::new();
            for (_, s) in l.deadlines.iter_mut() {
                if !s.fired && s.at.is_some_and(|at| at <= now) {
                    s.fired = true;
                    due.push(s.waker.clone());
                }
            }
            l.waiting -= due.len();
            due
        });
        due.into_iter().flatten().for_each(Waker::wake);
    }
}

/// Wakes every connection of this worker that waits in [`stopped`]; later waits end at once.
pub fn stop() {
    install();
    let waiting = with(|l| {
        l.stopped = true;
        l.stops
            .iter_mut()
            .filter(|(_, s)| !s.fired)
            .map(|(_, s)| {
                s.fired = true;
                s.waker.clone()
            })
            .collect::<Vec<_>>()
    });
    waiting.into_iter().flatten().for_each(Waker::wake);
}

/// A future that ends at `at` (at most [`TICK`] later on a worker thread).
pub fn deadline(at: Instant) -> Wait {
    match list_id() {
        Some(list) => Wait::Slot {
            kind: Kind::Deadline(at),
            list,
            slot: None,
        },
        None => Wait::Other(Box::pin(tokio::time::sleep_until(at.into()))),
    }
}

/// A future that ends when this worker is told to stop ([`stop`]); off a worker thread, when
/// `fallback` says so or its sender is gone.
pub fn stopped(mut fallback: watch::Receiver<bool>) -> Wait {
    match list_id() {
        Some(list) => Wait::Slot {
            kind: Kind::Stop,
            list,
            slot: None,
        },
        None => Wait::Other(Box::pin(async move {
            let _ = fallback.wait_for(|stop| *stop).await;
        })),
    }
}

/// What a [`Wait`] in a list waits for.
#[derive(Clone, Copy)]
pub enum Kind {
    Deadline(Instant),
    Stop,
}

/// A deadline or a wait for the stop signal; see [`deadline`] and [`stopped`].
pub enum Wait {
    /// In the list numbered `list` (the thread's where it was made); `slot` once registered.
    Slot {
        kind: Kind,
        list: u64,
        slot: Option<usize>,
    },
    Other(Pin<Box<dyn Future<Output = ()> + Send>>),
}

/// What a poll found in the list.
struct Polled {
    done: bool,
    slot: Option<usize>,
    /// The ticker, to wake now that a deadline waits.
    wake: Option<Waker>,
    /// A waker the slot held before, to drop.
    old: Option<Waker>,
}

impl List {
    fn poll_slot(&mut self, kind: Kind, slot: Option<usize>, cx: &Context<'_>) -> Polled {
        let slots = match kind {
            Kind::Deadline(_) => &mut self.deadlines,
            Kind::Stop => &mut self.stops,
        };
        let (done, slot, wake, old) = match slot {
            Some(i) => {
                let (done, old) = poll_registered(slots, i, cx);
                (done, Some(i), None, old)
            }
            None if matches!(kind, Kind::Stop) && self.stopped => (true, None, None, None),
            None => {
                let at = match kind {
                    Kind::Deadline(at) => Some(at),
                    Kind::Stop => None,
                };
                let i = slots.insert(Slot {
                    at,
                    waker: cx.waker().clone(),
                    fired: false,
                });
                let wake = match kind {
                    Kind::Deadline(_) => {
                        self.waiting += 1;
                        self.ticker.take()
                    }
                    Kind::Stop => None,
                };
                (false, Some(i), wake, None)
            }
        };
        Polled {
            done,
            slot,
            wake,
            old,
        }
    }
}

impl Future for Wait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let (kind, list, registered) = match this {
            Wait::Other(f) => return f.as_mut().poll(cx),
            Wait::Slot { kind, list, slot } => (*kind, *list, *slot),
        };
        let polled = with(|l| (l.id == list).then(|| l.poll_slot(kind, registered, cx))).flatten();
        let Some(polled) = polled else {
            // Polled away from the thread whose list it is in, or after that list is gone.
            // Nothing in the gateway does this (a worker's futures stay on its thread); if it
            // happens, a deadline keeps its time on tokio's timer and a stop wait ends.
            debug_assert!(false, "a wake-up polled away from its worker's list");
            if let Wait::Slot { slot, .. } = this {
                *slot = None;
            }
            return match kind {
                Kind::Deadline(at) => {
                    *this = Wait::Other(Box::pin(tokio::time::sleep_until(at.into())));
                    Pin::new(this).poll(cx)
                }
                Kind::Stop => Poll::Ready(()),
            };
        };
        if let Wait::Slot { slot, .. } = this {
            *slot = polled.slot;
        }
        if let Some(w) = polled.wake {
            w.wake();
        }
        drop(polled.old);
        if polled.done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        let Wait::Slot {
            kind,
            list,
            slot: Some(i),
        } = *self
        else {
            return;
        };
        // The slot (and its waker) is dropped after the list's borrow ends. A drop that
        // comes while the list is borrowed leaves the slot behind rather than panic.
        let _removed = LIST.try_with(|l| {
            let mut l = l.try_borrow_mut().ok()?;
            let l = l.as_mut().filter(|l| l.id == list)?;
            match kind {
                Kind::Deadline(_) => {
                    let s = l.deadlines.try_remove(i)?;
                    if !s.fired {
                        l.waiting -= 1;
                    }
                    Some(s)
                }
                Kind::Stop => l.stops.try_remove(i),
            }
        });
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

    /// `f`'s output, failing the test with `what` unless it comes within 5 s.
    async fn soon<T>(f: impl Future<Output = T>, what: &str) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .unwrap_or_else(|_| panic!("{what}"))
    }

    /// Runs `test` as on a worker: a single-threaded runtime whose wake-up task is running.
    fn on_a_worker(test: impl Future<Output = ()>) {
        runtime().block_on(async {
            tokio::spawn(run());
            tokio::task::yield_now().await;
            test.await;
        });
    }

    #[test]
    fn a_deadline_fires_after_its_time_never_before_and_at_most_a_tick_late() {
        on_a_worker(async {
            for ms in [0u64, 30, 120, 260] {
                let start = Instant::now();
                let at = start + Duration::from_millis(ms);
                soon(deadline(at), "a deadline never fired").await;
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
        on_a_worker(async {
            let far = Instant::now() + Duration::from_secs(3600);
            for _ in 0..3 {
                let r = tokio::time::timeout(Duration::from_millis(10), deadline(far)).await;
                assert!(r.is_err(), "a deadline an hour away fired");
            }
            // None is held, none is counted, and the one slot used is the next to be used.
            let (held, next, waiting) =
                with(|l| (l.deadlines.len(), l.deadlines.vacant_key(), l.waiting)).unwrap();
            assert_eq!((held, next, waiting), (0, 0, 0));
        });
    }

    #[test]
    fn stop_wakes_every_waiting_connection_and_ends_later_waits_at_once() {
        on_a_worker(async {
            let (_tx, rx) = watch::channel(false);
            let waits: Vec<_> = (0..3).map(|_| tokio::spawn(stopped(rx.clone()))).collect();
            tokio::task::yield_now().await;
            for w in &waits {
                assert!(!w.is_finished());
            }
            stop();
            for w in waits {
                soon(w, "a connection was not told to stop").await.unwrap();
            }
            soon(stopped(rx), "a wait begun after the stop did not end").await;
        });
    }

    /// A worker may be told to stop before its wake-up task has first run (its queue closed
    /// at once): the stop still holds for every connection that waits later.
    #[test]
    fn a_stop_before_the_wake_up_task_runs_is_not_lost() {
        runtime().block_on(async {
            stop();
            tokio::spawn(run());
            tokio::task::yield_now().await;
            let (_tx, rx) = watch::channel(false);
            soon(stopped(rx), "the stop was lost").await;
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
            soon(w, "the stop channel did not end the wait")
                .await
                .unwrap();
        });
    }
}
