//! Signals a connection checks on every wake-up but that rarely fire (the drain, a
//! kick): [`Quiet`] polls such a future only after the future itself woke the task.
//!
//! A connection's task wakes once per message. Polling the drain signal each time
//! (a `CancellationToken` every connection shares) takes two locks that every connection
//! shares, which showed in profiles; a [`Quiet`] check is two uncontended atomic
//! operations.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use futures_util::task::AtomicWaker;

/// Wraps a future that is polled only when it has woken (and once at first).
pub struct Quiet<F> {
    fut: F,
    flag: Arc<Flag>,
    waker: Waker,
}

struct Flag {
    /// Set by the wrapped future's wake-up, cleared when it is polled.
    woken: AtomicBool,
    /// The task to wake.
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> Quiet<F> {
    /// Wraps `fut`.
    pub fn new(fut: F) -> Self {
        let flag = Arc::new(Flag { woken: AtomicBool::new(true), task: AtomicWaker::new() });
        Self { fut, waker: Waker::from(flag.clone()), flag }
    }

    /// Polls the future if it woke since it was last polled; `Pending` otherwise.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Register first, then look at the flag: a wake-up in between is not lost.
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut self.fut).poll(&mut Context::from_waker(&self.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn polls_the_inner_future_only_after_its_own_wake_up() {
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let notify = Arc::new(tokio::sync::Notify::new());
        let counted = polls.clone();
        let n = notify.clone();
        let mut quiet = Quiet::new(Box::pin(async move {
            counted.fetch_add(1, Ordering::Relaxed);
            n.notified().await;
            counted.fetch_add(1, Ordering::Relaxed);
        }));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(quiet.poll(&mut cx).is_pending(), "first poll registers");
        for _ in 0..5 {
            assert!(quiet.poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "not polled again without a wake-up");
        notify.notify_one();
        assert!(quiet.poll(&mut cx).is_ready(), "polled after its wake-up");
    }
}
