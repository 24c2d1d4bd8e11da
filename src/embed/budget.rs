//! A memory budget for decoding: every decode reserves what `decode_cost` says it will take at
//! its peak before it allocates anything, and waits (the sync) or is turned away (the search
//! service) while the budget is spent. So peak memory stays under the bound whatever the inputs:
//! a few huge images at once take turns, and one larger than the whole budget is refused.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::DecodeError;

/// Reservations are counted in 64 KiB units (a semaphore counts in u32).
const UNIT: u64 = 64 << 10;

#[derive(Clone)]
pub struct MemoryBudget {
    units: Arc<Semaphore>,
    total: u32,
}

/// Memory reserved until dropped.
pub struct Reservation(#[allow(dead_code)] OwnedSemaphorePermit);

impl MemoryBudget {
    pub fn new(bytes: u64) -> Self {
        let total = (bytes / UNIT).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        Self { units: Arc::new(Semaphore::new(total as usize)), total }
    }

    pub fn bytes(&self) -> u64 {
        u64::from(self.total) * UNIT
    }

    fn units(&self, bytes: u64) -> Result<u32, DecodeError> {
        let n = bytes.div_ceil(UNIT);
        if n > u64::from(self.total) {
            return Err(DecodeError::OverBudget { needed: bytes, budget: self.bytes() });
        }
        Ok(n as u32)
    }

    /// Waits until `bytes` are free; refuses more than the whole budget.
    pub async fn reserve(&self, bytes: u64) -> Result<Reservation, DecodeError> {
        let n = self.units(bytes)?;
        Ok(Reservation(self.units.clone().acquire_many_owned(n).await.expect("the budget is never closed")))
    }

    /// `bytes` if free now; None while the budget is spent.
    pub fn try_reserve(&self, bytes: u64) -> Result<Option<Reservation>, DecodeError> {
        let n = self.units(bytes)?;
        Ok(self.units.clone().try_acquire_many_owned(n).ok().map(Reservation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_and_oversized_ones_are_refused() {
        let budget = MemoryBudget::new(10 << 20);
        let a = budget.reserve(6 << 20).await.unwrap();
        assert!(budget.try_reserve(6 << 20).unwrap().is_none(), "over the budget while a holds 6 MB");
        let b = budget.try_reserve(4 << 20).unwrap().expect("4 MB are free");
        drop(a);
        assert!(budget.try_reserve(6 << 20).unwrap().is_some());
        drop(b);
        assert!(matches!(budget.reserve(11 << 20).await, Err(DecodeError::OverBudget { .. })));
    }
}
