//! Dynamic loss scaling for mixed-precision training, with the semantics of PyTorch's
//! `torch.amp.GradScaler` defaults: the loss is multiplied by the scale before the backward (so
//! that small gradients survive f16 operands), the gradients are divided by it before the
//! optimiser, and a step whose gradients hold an Inf or NaN is skipped and halves the scale;
//! 2,000 finite steps in a row double it.

use serde::{Deserialize, Serialize};

/// GradScaler's `init_scale`.
pub const INIT_SCALE: f64 = 65_536.0;
/// GradScaler's `growth_factor`.
pub const GROWTH_FACTOR: f64 = 2.0;
/// GradScaler's `backoff_factor`.
pub const BACKOFF_FACTOR: f64 = 0.5;
/// GradScaler's `growth_interval`.
pub const GROWTH_INTERVAL: u64 = 2_000;

/// The scaler's state, kept in checkpoints so that a resumed run scales as the uninterrupted
/// one.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// The factor the loss is multiplied by.
    pub scale: f64,
    /// Finite steps since the scale last changed (GradScaler's `_growth_tracker`).
    pub growth_tracker: u64,
    /// Steps skipped for non-finite gradients in the run so far.
    pub skipped: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        Self {
            scale: INIT_SCALE,
            growth_tracker: 0,
            skipped: 0,
        }
    }
}

impl LossScale {
    /// After a step whose (unscaled) gradients were `finite` on every rank: whether the
    /// optimiser step applies. Updates the scale as GradScaler's `update()` does.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale *= BACKOFF_FACTOR;
            self.growth_tracker = 0;
            self.skipped += 1;
            return false;
        }
        self.growth_tracker += 1;
        if self.growth_tracker == GROWTH_INTERVAL {
            self.scale *= GROWTH_FACTOR;
            self.growth_tracker = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_two_to_the_sixteen() {
        let s = LossScale::default();
        assert_eq!((s.scale, s.growth_tracker, s.skipped), (65_536.0, 0, 0));
    }

    #[test]
    fn doubles_after_exactly_two_thousand_finite_steps() {
        let mut s = LossScale::default();
        for _ in 0..1_999 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, 65_536.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.growth_tracker), (131_072.0, 0));
    }

    #[test]
    fn a_non_finite_step_is_skipped_halves_the_scale_and_restarts_the_count() {
        let mut s = LossScale::default();
        for _ in 0..1_500 {
            s.update(true);
        }
        assert!(!s.update(false));
        assert_eq!((s.scale, s.growth_tracker, s.skipped), (32_768.0, 0, 1));
        // The 2,000 steps are counted again from the skip.
        for _ in 0..1_999 {
            s.update(true);
        }
        assert_eq!(s.scale, 32_768.0);
        s.update(true);
        assert_eq!(s.scale, 65_536.0);
    }

    #[test]
    fn repeated_overflows_keep_halving() {
        let mut s = LossScale::default();
        for _ in 0..3 {
            assert!(!s.update(false));
        }
        assert_eq!((s.scale, s.skipped), (8_192.0, 3));
    }
}
