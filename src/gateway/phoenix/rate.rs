//! The inbound rate limit of one socket.

use tokio::time::Instant;

/// `per_second` frames per second sustained, `burst` at once.
pub struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, burst: u32) -> Self {
        TokenBucket {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            refilled_at: Instant::now(),
        }
    }

    /// Takes one token; false when none is left.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_refuses() {
        let mut bucket = TokenBucket::new(50, 100);
        assert!((0..100).all(|_| bucket.take()));
        assert!(!bucket.take());
    }

    #[tokio::test(start_paused = true)]
    async fn refills_at_the_sustained_rate() {
        let mut bucket = TokenBucket::new(50, 100);
        while bucket.take() {}
        tokio::time::advance(std::time::Duration::from_millis(100)).await;
        assert_eq!((0..10).filter(|_| bucket.take()).count(), 5, "50/s for 100 ms");
    }
}
