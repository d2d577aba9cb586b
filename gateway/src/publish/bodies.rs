//! The node's budget of publish request-body bytes held at once
//! (`--max-body-bytes-in-flight`): a body takes its bytes as they arrive and gives them
//! back when it is dropped; past the budget, new bodies get 503 `over_capacity`.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::ApiError;

/// The node's budget of request-body bytes held at once.
#[derive(Debug)]
pub struct BodyBudget {
    held: AtomicUsize,
    max: usize,
}

/// Bytes taken from a [`BodyBudget`]; given back on drop.
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a BodyBudget,
    bytes: usize,
}

impl BodyBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { held: AtomicUsize::new(0), max }
    }

    /// An empty hold to grow as a body arrives.
    pub fn hold(&self) -> Held<'_> {
        Held { budget: self, bytes: 0 }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

impl Held<'_> {
    /// Takes `n` more bytes, or refuses when the node holds its budget already.
    pub fn grow(&mut self, n: usize) -> Result<(), ApiError> {
        let budget = self.budget;
        let before = budget.held.fetch_add(n, Ordering::AcqRel);
        if before + n > budget.max {
            budget.held.fetch_sub(n, Ordering::AcqRel);
            metrics::counter!(crate::metrics::LIMIT_REJECTIONS_TOTAL, "limit" => "body_bytes").increment(1);
            return Err(ApiError::over_capacity(
                "this node holds as many request bodies as it may; retry shortly or use another node",
            ));
        }
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_past_its_size_and_frees_on_drop() {
        let budget = BodyBudget::new(10);
        let mut a = budget.hold();
        a.grow(6).unwrap();
        let mut b = budget.hold();
        assert_eq!(b.grow(5).unwrap_err().status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        b.grow(4).unwrap();
        assert_eq!(budget.held(), 10);
        drop(a);
        assert_eq!(budget.held(), 4);
        drop(b);
        assert_eq!(budget.held(), 0);
    }
}
