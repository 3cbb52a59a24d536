//! Helpers shared by the integration tests: running the binary (alone or under `mpirun`, always
//! under a timeout), reading what a run wrote, fixtures, and the reference implementations in
//! Python (required in CI, skipped elsewhere only when their packages are missing).
#![allow(dead_code)] // each test file uses its own subset

pub mod fuzz;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The tiny training config of the integration tests (seconds per run).
pub const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny.toml");
/// The study's config.
pub const LIVERMASK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/livermask.toml");

/// The ctseg binary under test: `CTSEG_BIN` when set (a test binary carried to another machine
/// with its ctseg, as scripts/gpu_device_check.sh does), else the one cargo built beside it.
pub fn bin() -> String {
    std::env::var("CTSEG_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ctseg").to_string())
}

/// `ctseg ARGS` on two threads, under a 20-minute timeout.
pub fn ctseg(args: &[&str]) -> Output {
    ctseg_env(args, &[])
}

/// `ctseg ARGS` with extra environment variables.
pub fn ctseg_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    ctseg_command(None, args, env)
}

/// `[wrapper] ctseg ARGS` on two threads with extra environment variables, under a 20-minute
/// timeout.
fn ctseg_command(wrapper: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("timeout");
    c.arg("1200");
    if let Some(w) = wrapper {
        c.arg(w);
    }
    c.arg(bin()).args(args).env("RAYON_NUM_THREADS", "2");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run ctseg")
}

/// A private Open MPI session folder for one job. Open MPI 4 keeps every job's session directory
/// in one per-user folder (/tmp/ompi.HOST.UID) and the job that empties it removes it, so a job
/// starting at that moment fails in orte_init ("A call to mkdir was unable to create the desired
/// directory"): that is how two tests of one binary, launching mpirun in parallel, failed CI.
pub struct MpiSession(tempfile::TempDir);

impl MpiSession {
    pub fn new() -> Self {
        Self(
            tempfile::Builder::new()
                .prefix("ctseg-ompi")
                .tempdir()
                .expect("tmp"),
        )
    }

    /// Points every mpirun that `c` starts (itself, or through a script or `ctseg bench
    /// scaling`) at this folder, and lets it run as root if need be.
    pub fn apply<'c>(&self, c: &'c mut Command) -> &'c mut Command {
        c.env("OMPI_MCA_orte_tmpdir_base", self.0.path())
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
    }
}

impl Default for MpiSession {
    fn default() -> Self {
        Self::new()
    }
}

/// `mpirun` (oversubscribed, unbound, TCP and shared memory) in `session`, before its `-np` or
/// program arguments; under `timeout` when given one, so that a hang fails the test instead of
/// the CI run.
pub fn mpirun_command(session: &MpiSession, timeout_s: Option<u64>) -> Command {
    let mut c = match timeout_s {
        Some(t) => {
            let mut c = Command::new("timeout");
            c.arg(t.to_string()).arg("mpirun");
            c
        }
        None => Command::new("mpirun"),
    };
    c.args([
        "--oversubscribe",
        "--bind-to",
        "none",
        "--mca",
        "btl",
        "self,vader,tcp",
    ]);
    session.apply(&mut c);
    c
}

/// `mpirun -np NP ctseg ARGS` in a session of its own, killed after `timeout_s`.
pub fn mpirun(np: usize, args: &[&str], env: &[(&str, &str)], timeout_s: u64) -> Output {
    let session = MpiSession::new();
    let mut c = mpirun_command(&session, Some(timeout_s));
    c.args(["-np", &np.to_string()]).arg(bin()).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run mpirun (is OpenMPI installed?)")
}

/// Stdout and stderr together.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The output of a command that must succeed.
pub fn ok(o: Output) -> String {
    let t = text(&o);
    assert!(o.status.success(), "failed ({}):\n{t}", o.status);
    t
}

/// The output of a command that must fail with `code`, naming each of `needles`, without a
/// panic.
pub fn fails_with(o: Output, code: i32, needles: &[&str]) -> String {
    let t = text(&o);
    assert_eq!(o.status.code(), Some(code), "expected exit {code}:\n{t}");
    for n in needles {
        assert!(t.contains(n), "message lacks {n:?}:\n{t}");
    }
    assert!(
        !t.contains("panicked"),
        "a panic is not an error message:\n{t}"
    );
    t
}

/// A path as a `&str` argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap_or("")
}

/// `tests/fixtures/tiny.toml` edited by `edit`, written as `dir/name`.
pub fn write_config(dir: &Path, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, edit(std::fs::read_to_string(TINY).expect("tiny"))).expect("write config");
    p
}

/// The metrics a run logged.
pub fn metrics(run: &Path) -> ctseg::rundir::Metrics {
    ctseg::rundir::metrics::read(&run.join(ctseg::rundir::METRICS)).expect("metrics")
}

/// The training losses a run logged, step by step.
pub fn losses(run: &Path) -> Vec<f64> {
    metrics(run).steps.iter().map(|s| s.loss).collect()
}

/// Steps a run has logged so far (0 before its metrics file exists): for polling a running job.
pub fn steps_logged(run: &Path) -> usize {
    std::fs::read_to_string(run.join(ctseg::rundir::METRICS))
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("\"kind\":\"step\""))
                .count()
        })
        .unwrap_or(0)
}

/// The summary a run wrote.
pub fn summary(run: &Path) -> ctseg::rundir::Summary {
    ctseg::rundir::Summary::read(&run.join(ctseg::rundir::SUMMARY)).expect("summary")
}

/// A fixture file, e.g. `fixture("nifti/liver.nii.gz")`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// A script under `tests/reference/`.
pub fn reference_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(name)
}

/// Whether reference tests must run: in CI (`CI=true`, as `.ci/run` and `scripts/test` set it)
/// or when `CTSEG_REQUIRE_REFERENCES=1`.
pub fn references_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("CTSEG_REQUIRE_REFERENCES").is_ok_and(|v| v == "1")
}

/// The Python interpreter with the reference packages: `CTSEG_PYTHON` (the venv that
/// `scripts/test` makes), else `python3`.
pub fn python() -> String {
    std::env::var("CTSEG_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs a Python reference (`args` after the interpreter, with `env`) that needs `modules`, and
/// returns its stdout. When the interpreter or a module is missing, the test fails in CI and is
/// skipped elsewhere (`None`, with the reason on stderr); when the reference itself fails, the
/// test always fails.
pub fn python_reference(
    what: &str,
    modules: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
) -> Option<String> {
    let probe = Command::new(python())
        .arg("-c")
        .arg(format!("import {}", modules.join(", ")))
        .output();
    let missing = match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .to_string(),
        ),
        Err(e) => Some(format!("{} not found ({e})", python())),
    };
    if let Some(why) = missing {
        assert!(
            !references_required(),
            "{what}: the reference needs Python with {modules:?}, which this CI run lacks: {why} (scripts/test installs them)"
        );
        eprintln!("{what}: not run here, Python lacks {modules:?}: {why}");
        return None;
    }
    let mut c = Command::new(python());
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run python");
    assert!(
        o.status.success(),
        "{what}: the reference failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Some(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The JSON lines of `ctseg bench ... --json` output whose `bench` field is `kind`, in order.
pub fn bench_lines(out: &str, kind: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["bench"] == kind)
        .collect()
}

/// The rows of `ctseg bench kernels --json --reps 1` on one small layer (2 images of 12 × 10,
/// 3 → 7 channels: partial tiles in every direction), run on an adapter with cooperative
/// matrices as [`ctseg_with_cooperative_matrices`] runs it; `None` where that skips.
pub fn small_layer_kernel_rows(here: bool) -> Option<Vec<serde_json::Value>> {
    let args = [
        "bench",
        "kernels",
        "--case",
        "2,3,12,10,7",
        "--reps",
        "1",
        "--json",
    ];
    let out = ctseg_with_cooperative_matrices(&args, here)?;
    Some(bench_lines(&ok(out), "kernels"))
}

/// The gunzipped `bytes` (a fixture's `.nii.gz`).
pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

/// `bytes` as one gzip member.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    w.write_all(bytes).expect("gzip");
    w.finish().expect("gzip")
}

/// The lavapipe with cooperative matrices that scripts/lavapipe_coop.sh prepares
/// (`CTSEG_COOP_LAVAPIPE`, set by scripts/test), when it is ready.
pub fn coop_lavapipe() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("CTSEG_COOP_LAVAPIPE")?);
    dir.join("run").is_file().then_some(dir)
}

/// Whether GPU tests must run rather than skip (CI, or `CTSEG_REQUIRE_GPU=1`).
pub fn gpu_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("CTSEG_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Whether the calling test, `name` in this test binary, runs its body here: yes when this
/// process's adapter has cooperative matrices (`here`). Otherwise the test binary runs that one
/// test again on scripts/lavapipe_coop.sh's lavapipe, which has them, this asserts that it
/// passed there, and the answer is no. Without that lavapipe the test fails where GPU tests are
/// required and is skipped elsewhere.
pub fn cooperative_matrices_here(name: &str, here: bool) -> bool {
    if here {
        return true;
    }
    assert!(
        std::env::var_os("CTSEG_IN_COOP_LAVAPIPE").is_none(),
        "{name}: run on the lavapipe of scripts/lavapipe_coop.sh, whose adapter offers no cooperative matrices"
    );
    let Some(dir) = coop_lavapipe() else {
        assert!(
            !gpu_required(),
            "{name} needs an adapter with cooperative matrices: run scripts/test (it prepares Mesa 26's lavapipe with scripts/lavapipe_coop.sh)"
        );
        eprintln!("skipped: no adapter with cooperative matrices (scripts/lavapipe_coop.sh)");
        return false;
    };
    let exe = std::env::current_exe().expect("the test binary's path");
    // The re-run must not skip for want of an adapter: it fails instead.
    let out = Command::new("timeout")
        .arg("1200")
        .arg(dir.join("run"))
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("CTSEG_IN_COOP_LAVAPIPE", "1")
        .env("CTSEG_REQUIRE_GPU", "1")
        .output()
        .expect("run the test binary on the cooperative-matrix lavapipe");
    let log = text(&out);
    eprintln!("{log}");
    assert!(
        out.status.success() && log.contains("test result: ok. 1 passed"),
        "{name} on the cooperative-matrix lavapipe ({}): {log}",
        dir.display()
    );
    false
}

/// `ctseg ARGS` on an adapter with cooperative matrices: this machine's own (`here`), else
/// scripts/lavapipe_coop.sh's; `None` (skipped) where neither exists and GPU tests are not
/// required.
pub fn ctseg_with_cooperative_matrices(args: &[&str], here: bool) -> Option<Output> {
    if here {
        return Some(ctseg(args));
    }
    match coop_lavapipe() {
        Some(dir) => Some(ctseg_command(Some(&dir.join("run")), args, &[])),
        None => {
            assert!(
                !gpu_required(),
                "an adapter with cooperative matrices is needed: run scripts/test (it prepares one with scripts/lavapipe_coop.sh)"
            );
            eprintln!("skipped: no adapter with cooperative matrices");
            None
        }
    }
}

/// Checks mixed precision's overflow check (`ctseg::finite::all_finite`) on `device` against the
/// host's `f32::is_finite`: finite extremes (the largest f32, the smallest normal and subnormal,
/// -0) pass, and one Inf, -Inf or NaN among 70,000 values, at a different place each time
/// (other workgroups), is found.
pub fn assert_overflow_check_is_exact(device: &burn::tensor::Device) {
    use burn::tensor::{Tensor, TensorData};
    let finite = [
        0.0f32,
        -0.0,
        1.0,
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
    ];
    let check = |v: Vec<f32>| {
        let n = v.len();
        let t = Tensor::<1>::from_data(TensorData::new(v, [n]), device);
        ctseg::finite::all_finite(t).expect("check")
    };
    assert!(check(finite.repeat(1000)));
    for (k, bad) in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN]
        .into_iter()
        .enumerate()
    {
        let mut v = finite.repeat(10_000);
        let at = (k * 31_337 + 5) % v.len();
        v[at] = bad;
        assert!(!check(v), "{bad} not found");
    }
}

/// Checks mixed precision's unscale (`ctseg::finite::unscale`) on `device` against the host:
/// every value of four tensors (1 to 70,000 values, so several workgroups) equals the host's f32
/// product by 1/scale, a subnormal result also when flushed to zero (adapters may flush); the
/// tensors keep their lengths; and the one flag they share is raised by an Inf, -Inf or NaN in
/// the first or the last tensor, and by a finite value that a scale below 1 takes past f32's
/// range, and by nothing else.
pub fn assert_unscale_is_exact(device: &burn::tensor::Device) {
    use burn::tensor::{Tensor, TensorData};
    let lens = [3usize, 70_000, 1, 257];
    let values = |k: usize, n: usize| -> Vec<f32> {
        let extremes = [
            1.0f32,
            -0.0,
            f32::MAX,
            -3.5e-3,
            f32::MIN_POSITIVE,
            1e-45,
            6.0e4,
        ];
        (0..n)
            .map(|i| extremes[(i + k) % extremes.len()] * (1.0 - (i % 1000) as f32 * 1e-4))
            .collect()
    };
    let run = |parts: Vec<Vec<f32>>, scale: f64| {
        let tensors = parts
            .into_iter()
            .map(|v| {
                let n = v.len();
                Tensor::<1>::from_data(TensorData::new(v, [n]), device)
            })
            .collect();
        let (out, finite) = ctseg::finite::unscale(tensors, scale).expect("unscale");
        let out: Vec<Vec<f32>> = out
            .into_iter()
            .map(|t| ctseg::tensor_util::to_f32(t).expect("f32"))
            .collect();
        (out, finite)
    };
    let parts: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| values(k, n))
        .collect();
    let scale = 65_536.0;
    let (out, finite) = run(parts.clone(), scale);
    assert!(finite, "finite gradients flagged");
    for (k, (got, want)) in out.iter().zip(&parts).enumerate() {
        assert_eq!(got.len(), want.len(), "tensor {k}'s length");
        for (i, (&g, &v)) in got.iter().zip(want).enumerate() {
            let w = v * (1.0 / scale) as f32;
            let flushed = w.abs() < f32::MIN_POSITIVE && g == 0.0;
            assert!(
                g.to_bits() == w.to_bits() || flushed,
                "tensor {k}, value {i}: {v:e} / {scale} gave {g:e}, the host {w:e}"
            );
        }
    }
    for (k, bad) in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN]
        .into_iter()
        .enumerate()
    {
        for at in [0, lens.len() - 1, 1] {
            let mut p = parts.clone();
            let i = (k * 31_337 + 5) % p[at].len();
            p[at][i] = bad;
            assert!(!run(p, scale).1, "{bad} in tensor {at} not found");
        }
    }
    // 2.0e38 is finite; divided by a scale of 0.5 it is not.
    let mut p: Vec<Vec<f32>> = parts
        .iter()
        .map(|v| v.iter().map(|x| x.clamp(-1.0, 1.0)).collect())
        .collect();
    assert!(
        run(p.clone(), 0.5).1,
        "values within range after unscaling flagged"
    );
    p[1][40_000] = 2.0e38;
    assert!(
        !run(p, 0.5).1,
        "an overflow by the unscaling itself not found"
    );
}

/// What `--backend gpu` asks for by default: the first hardware adapter (else a software one),
/// burn's convolutions, cooperative matrices allowed.
pub fn gpu_request() -> ctseg::backend::DeviceRequest {
    ctseg::backend::DeviceRequest {
        kind: ctseg::backend::BackendKind::Gpu,
        threads: 0,
        adapter: None,
        gpu_conv: Default::default(),
        cooperative_matrices: true,
    }
}
