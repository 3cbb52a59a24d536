//! Fault injection for the tests that check that a failing rank brings an MPI job down
//! promptly. Compiled in only with the `test-hooks` feature (the test suite's builds); in
//! other builds [`inject`] is empty.
//!
//! `CTSEG_FAULT_INJECT=<point>:<rank>:<n>` makes rank `<rank>` panic at the `n`-th pass through
//! `<point>`: `step` (after optimiser step n), `loader` (while building batch n of an epoch),
//! `bench` (in timed bench step n).

/// Panics when the environment asks for a fault at this point, rank and count.
#[cfg(feature = "test-hooks")]
pub fn inject(point: &str, rank: usize, n: u64) {
    if let Ok(spec) = std::env::var("CTSEG_FAULT_INJECT") {
        let parts: Vec<&str> = spec.split(':').collect();
        if let [p, r, k] = parts.as_slice()
            && *p == point
            && r.parse() == Ok(rank)
            && k.parse() == Ok(n)
        {
            panic!("CTSEG_FAULT_INJECT: rank {rank} fails at {point} {n}");
        }
    }
}

/// Without the `test-hooks` feature: nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn inject(_point: &str, _rank: usize, _n: u64) {}
