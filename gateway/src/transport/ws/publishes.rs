//! A WebSocket connection's publish ops waiting for the broker: queued in op order
//! (so they are published in that order), answered as they complete, in that order.

use std::{
    collections::VecDeque,
    task::{Context, Poll},
};

use futures_util::future::BoxFuture;
use shared::protocol::ServerFrame;

/// Most publish ops of one connection waiting for the broker; the session stops
/// reading the client while this many are.
pub(super) const MAX_PUBLISHES_IN_FLIGHT: usize = 256;

/// A connection's publish ops waiting for the broker, in the order they came.
#[derive(Default)]
pub(super) struct Publishes(VecDeque<BoxFuture<'static, ServerFrame>>);

impl Publishes {
    /// Queues the answer of the next publish op.
    pub(super) fn push(&mut self, answer: BoxFuture<'static, ServerFrame>) {
        self.0.push_back(answer);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the session may read another op.
    pub(super) fn has_room(&self) -> bool {
        self.0.len() < MAX_PUBLISHES_IN_FLIGHT
    }

    /// The answers of the publishes done at the front of the queue, in order; pending
    /// while the first is not done (or none is in flight).
    pub(super) fn poll_answered(&mut self, cx: &mut Context<'_>) -> Poll<Vec<ServerFrame>> {
        let mut frames = Vec::new();
        while let Some(front) = self.0.front_mut() {
            match front.as_mut().poll(cx) {
                Poll::Ready(frame) => {
                    frames.push(frame);
                    self.0.pop_front();
                }
                Poll::Pending => break,
            }
        }
        if frames.is_empty() { Poll::Pending } else { Poll::Ready(frames) }
    }
}
