//! Fault injection for the tests that check that a failing rank brings an MPI job down
//! promptly. Compiled in only with the `test-hooks` feature (the test suite's builds); in
//! other builds [`inject`] is empty.
//!
//! `CTSEG_FAULT_INJECT=<point>:<rank>:<n>` makes rank `<rank>` panic at the `n`-th pass through
//! `<point>`: `step` (after optimiser step n), `loader` (while building batch n of an epoch),
//! `bench` (in timed bench step n). One point does not panic: `overflow` makes rank `<rank>`'s
//! gradients of step n count as not finite in mixed precision ([`fires`]), and `wgsl-conv`
//! (with n = 0) gives ctseg's 3×3 convolution kernels a source the adapter's WGSL compiler
//! rejects, as a driver that cannot build them would (src/model/gpu_conv.rs).

/// Whether the environment asks for a fault at this point, rank and count.
#[cfg(feature = "test-hooks")]
pub fn fires(point: &str, rank: usize, n: u64) -> bool {
    std::env::var("CTSEG_FAULT_INJECT").is_ok_and(|spec| {
        let parts: Vec<&str> = spec.split(':').collect();
        matches!(parts.as_slice(), [p, r, k]
            if *p == point && r.parse() == Ok(rank) && k.parse() == Ok(n))
    })
}

/// Without the `test-hooks` feature: never.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn fires(_point: &str, _rank: usize, _n: u64) -> bool {
    false
}

/// Panics when the environment asks for a fault at this point, rank and count.
pub fn inject(point: &str, rank: usize, n: u64) {
    if fires(point, rank, n) {
        panic!("CTSEG_FAULT_INJECT: rank {rank} fails at {point} {n}");
    }
}

/// This process's rank as its launcher tells it (Open MPI, MPICH, Slurm), 0 without one: for
/// fault points in code that holds no communicator.
pub fn launcher_rank() -> usize {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Whether ctseg's 3×3 convolution kernels are to be broken on this rank (`wgsl-conv`): the
/// kernels' source and the identity under which their timings are kept both ask here.
pub fn wgsl_conv_broken() -> bool {
    fires("wgsl-conv", launcher_rank(), 0)
}
